#include "core/dynlib.h"

#include <dlfcn.h>

namespace sp {

DynLib::DynLib(const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    lib_ = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib_) return;
  }
  const char* why = dlerror();
  load_error_ = why ? why : "not found";
}

DynLib::~DynLib() {
  if (lib_) dlclose(lib_);
}

void* DynLib::symbol(const char* sym) {
  void* p = lib_ ? dlsym(lib_, sym) : nullptr;
  if (!p) missing_ += (missing_.empty() ? "" : ", ") + std::string(sym);
  return p;
}

}  // namespace sp
