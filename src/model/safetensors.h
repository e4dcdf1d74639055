// Memory-mapped safetensors checkpoints: one file or shards named by model.safetensors.index.json.
// The header parser is strict: every tensor lies inside the file's data area, tensors do not
// overlap, byte sizes match dtype x shape, and the header length is bounded. The header is JSON
// starting with '{', optionally padded with trailing spaces (as the safetensors format allows); NUL
// bytes, duplicate tensor names and duplicate keys are refused. Only regular files are opened.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
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

// Most dimensions of a tensor.
constexpr size_t kMaxRank = 8;

// Parses a whole safetensors image in memory (8-byte header length, header, data); the tensors'
// data pointers point into it. `path` names it in errors.
Result<std::map<std::string, TensorInfo>> parse_safetensors(const uint8_t* base, int64_t size,
                                                            const std::string& path);

// One mapped file. Read-only; unmapped on destruction.
class SafetensorsFile {
 public:
  static constexpr int64_t kMaxHeaderBytes = 100 << 20;  // 100 MiB; real headers are < 10 MiB
  static Result<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  // The same from bytes already in memory (tests, fuzzing); `name` names it in errors.
  static Result<std::unique_ptr<SafetensorsFile>> from_bytes(std::string bytes,
                                                             const std::string& name);
  ~SafetensorsFile();
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  int64_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  int64_t size_ = 0;
  std::string owned_;  // from_bytes
  std::map<std::string, TensorInfo> tensors_;
};

// model.safetensors.index.json: at most kMaxIndexBytes, shard names are plain file names.
constexpr int64_t kMaxIndexBytes = int64_t{64} << 20;  // the released Pro's is ~10 MiB
constexpr size_t kMaxShards = 65536;
struct SafetensorsIndex {
  std::vector<std::string> shards;                // in first-mention order
  std::map<std::string, std::string> weight_map;  // tensor name -> shard file name
};
Result<SafetensorsIndex> parse_safetensors_index(std::string_view text, const std::string& source);

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
