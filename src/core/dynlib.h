// A shared library opened at run time (dlopen) instead of linked: for the large optional ones
// (NCCL, cuBLASLt) that every process would otherwise map at start-up, although few runs use them
// (and a process under a small `ulimit -v` could not even start).
#pragma once

#include <string>
#include <type_traits>
#include <vector>

namespace sp {

class DynLib {
 public:
  // Opens the first of `names` the loader finds (RTLD_NOW | RTLD_LOCAL).
  explicit DynLib(const std::vector<std::string>& names);
  ~DynLib();
  DynLib(const DynLib&) = delete;
  DynLib& operator=(const DynLib&) = delete;

  bool loaded() const { return lib_ != nullptr; }
  // Why none of the names could be opened (the loader's message), or "" when loaded.
  const std::string& load_error() const { return load_error_; }
  // Sets `fn` to the symbol `sym`, or to null and notes `sym` as missing.
  template <typename F>
  void get(F& fn, const char* sym) {
    static_assert(std::is_pointer_v<F>, "get: a function pointer");
    fn = reinterpret_cast<F>(symbol(sym));
  }
  // The symbols `get` did not find, comma-separated ("" when none).
  const std::string& missing() const { return missing_; }

 private:
  void* symbol(const char* sym);

  void* lib_ = nullptr;
  std::string load_error_, missing_;
};

}  // namespace sp
