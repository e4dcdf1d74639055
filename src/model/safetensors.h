// Memory-mapped safetensors checkpoints: one file or shards named by model.safetensors.index.json.
// The header parser is strict: every tensor lies inside the file's data area, tensors do not
// overlap, byte sizes match dtype x shape, and the header length is bounded.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace sp {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping
  int64_t nbytes = 0;
  std::string file;  // shard it came from
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

std::string shape_str(const std::vector<int64_t>& shape);

// One mapped file. Read-only; unmapped on destruction.
class SafetensorsFile {
 public:
  static constexpr int64_t kMaxHeaderBytes = 100 << 20;  // 100 MiB; real headers are < 10 MiB
  static Result<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  ~SafetensorsFile();
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  int64_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  int64_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a checkpoint directory, single-file or sharded.
class Checkpoint {
 public:
  static Result<std::unique_ptr<Checkpoint>> open(const std::string& dir);
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, const TensorInfo*>& all() const { return index_; }
  int num_files() const { return static_cast<int>(files_.size()); }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

// Writes a safetensors file (tests and tools use it to build checkpoints).
Status write_safetensors(const std::string& path, const std::vector<TensorInfo>& tensors);

}  // namespace sp
