#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace sp {

using nlohmann::json;

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += str(i ? ", " : "", shape[i]);
  return s + "]";
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ && size_ > 0) munmap(map_, static_cast<size_t>(size_));
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0)
    return Status::error(str("cannot open safetensors file ", path, ": ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return Status::error(str("cannot stat ", path));
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->size_ = st.st_size;
  if (f->size_ < 8) {
    ::close(fd);
    return Status::error(str(path, ": truncated safetensors file: ", f->size_,
                             " bytes, expected at least the 8-byte header length"));
  }
  f->map_ = mmap(nullptr, static_cast<size_t>(f->size_), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return Status::error(str("cannot mmap ", path));
  }
  const auto* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len;
  std::memcpy(&header_len, base, 8);
  if (header_len > static_cast<uint64_t>(kMaxHeaderBytes))
    return Status::error(str(path, ": safetensors header declares ", header_len,
                             " bytes; expected at most ", kMaxHeaderBytes));
  if (8 + static_cast<int64_t>(header_len) > f->size_)
    return Status::error(str(path, ": truncated safetensors file: header declares ", header_len,
                             " bytes but the file has only ", f->size_ - 8, " after the length"));
  json h;
  try {
    h = json::parse(std::string(reinterpret_cast<const char*>(base + 8), header_len));
  } catch (const std::exception& e) {
    return Status::error(str(path, ": safetensors header is not valid JSON: ", e.what()));
  }
  if (!h.is_object())
    return Status::error(str(path, ": safetensors header: expected a JSON object"));
  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  const int64_t data_size = f->size_ - data_start;
  std::vector<std::pair<int64_t, int64_t>> spans;  // [begin, end) in the data area
  std::vector<std::string> span_names;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const json& t = it.value();
    auto bad = [&](const std::string& what) {
      return Status::error(str(path, ": tensor '", name, "': ", what));
    };
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") ||
        !t.contains("data_offsets"))
      return bad("expected an object with dtype, shape and data_offsets");
    if (!t["dtype"].is_string()) return bad("dtype: expected a string");
    auto dt = dtype_from_name(t["dtype"].get<std::string>());
    if (!dt)
      return bad(str("unsupported dtype ", t["dtype"].dump(),
                     "; expected one of F32, BF16, F16, F8_E4M3, F8_E8M0, I8, I32, I64"));
    TensorInfo info;
    info.name = name;
    info.dtype = *dt;
    info.file = path;
    if (!t["shape"].is_array()) return bad("shape: expected an array of non-negative integers");
    int64_t numel = 1;
    for (auto& d : t["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        return bad("shape: expected an array of non-negative integers");
      int64_t v = d.get<int64_t>();
      if (v > 0 && numel > (int64_t{1} << 50) / v) return bad("shape: element count overflows");
      numel *= v;
      info.shape.push_back(v);
    }
    const json& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      return bad("data_offsets: expected [begin, end] with non-negative integers");
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e) return bad(str("data_offsets [", b, ", ", e, "]: begin after end"));
    if (e > static_cast<uint64_t>(data_size))
      return bad(str("data_offsets [", b, ", ", e, "] run past the end of the data area (",
                     data_size, " bytes): the file is truncated or the header is wrong"));
    int64_t expect = numel * dtype_size(*dt);
    if (static_cast<int64_t>(e - b) != expect)
      return bad(str("data_offsets span ", e - b, " bytes but ", dtype_name(*dt), " ",
                     shape_str(info.shape), " needs ", expect));
    info.data = base + data_start + b;
    info.nbytes = expect;
    spans.push_back({static_cast<int64_t>(b), static_cast<int64_t>(e)});
    span_names.push_back(name);
    f->tensors_.emplace(name, std::move(info));
  }
  std::vector<size_t> order(spans.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return spans[a] < spans[b]; });
  for (size_t i = 1; i < order.size(); ++i) {
    const auto& prev = spans[order[i - 1]];
    const auto& cur = spans[order[i]];
    if (cur.first < prev.second && cur.second > cur.first && prev.second > prev.first)
      return Status::error(str(path, ": tensors '", span_names[order[i - 1]], "' and '",
                               span_names[order[i]], "' overlap in the data area"));
  }
  return f;
}

Result<std::unique_ptr<Checkpoint>> Checkpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::unique_ptr<Checkpoint> ck(new Checkpoint());
  std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    json idx;
    try {
      idx = json::parse(in);
    } catch (const std::exception& e) {
      return Status::error(str(index_path, ": not valid JSON: ", e.what()));
    }
    if (!idx.contains("weight_map") || !idx["weight_map"].is_object())
      return Status::error(
          str(index_path, ": expected an object 'weight_map' from tensor name to shard file"));
    for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return Status::error(
            str(index_path, ": weight_map['", it.key(), "']: expected a file name"));
      std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..")
        return Status::error(str(index_path, ": weight_map['", it.key(), "'] = '", shard,
                                 "': expected a file name inside the model directory"));
      weight_map[it.key()] = shard;
      if (std::find(shard_names.begin(), shard_names.end(), shard) == shard_names.end())
        shard_names.push_back(shard);
    }
    for (auto& s : shard_names)
      if (!fs::exists(dir + "/" + s))
        return Status::error(
            str(index_path, " names shard '", s, "', which does not exist in ", dir));
  } else if (fs::exists(dir + "/model.safetensors")) {
    shard_names.push_back("model.safetensors");
  } else {
    return Status::error(str("no checkpoint in ", dir,
                             ": expected model.safetensors or model.safetensors.index.json"));
  }
  for (auto& s : shard_names) {
    SP_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open(dir + "/" + s));
    for (auto& [name, info] : f->tensors()) {
      if (ck->index_.count(name))
        return Status::error(str("tensor '", name, "' appears in both ", ck->index_[name]->file,
                                 " and ", info.file));
      if (!weight_map.empty()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end() || it->second != s)
          return Status::error(
              str(dir, "/", s, ": tensor '", name,
                  "' is not mapped to this shard by model.safetensors.index.json"));
      }
      ck->index_[name] = &info;
    }
    ck->files_.push_back(std::move(f));
  }
  for (auto& [name, shard] : weight_map)
    if (!ck->index_.count(name))
      return Status::error(str("model.safetensors.index.json maps tensor '", name, "' to ", shard,
                               ", which does not contain it"));
  return ck;
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

Status write_safetensors(const std::string& path, const std::vector<TensorInfo>& tensors) {
  json h = json::object();
  int64_t off = 0;
  for (auto& t : tensors) {
    h[t.name] = {{"dtype", dtype_name(t.dtype)},
                 {"shape", t.shape},
                 {"data_offsets", {off, off + t.nbytes}}};
    off += t.nbytes;
  }
  std::string hs = h.dump();
  while (hs.size() % 8) hs += ' ';
  std::ofstream out(path, std::ios::binary);
  if (!out) return Status::error(str("cannot write ", path));
  uint64_t n = hs.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(hs.data(), static_cast<std::streamsize>(hs.size()));
  for (auto& t : tensors) out.write(reinterpret_cast<const char*>(t.data), t.nbytes);
  return out ? Status::ok() : Status::error(str("write failed: ", path));
}

}  // namespace sp
