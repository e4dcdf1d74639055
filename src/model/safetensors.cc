#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/checked.h"
#include "model/strict_json.h"

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

namespace {

// Span of a tensor in the data area, for the overlap check.
struct Span {
  uint64_t begin, end;
  const std::string* name;
};

}  // namespace

Result<std::map<std::string, TensorInfo>> parse_safetensors(const uint8_t* base, int64_t size,
                                                            const std::string& path) {
  const std::string where = brief(path);
  if (size < 8)
    return Status::error(str(where, ": truncated safetensors file: ", size,
                             " bytes, expected at least the 8-byte header length"));
  uint64_t header_len;
  std::memcpy(&header_len, base, 8);
  if (header_len > static_cast<uint64_t>(SafetensorsFile::kMaxHeaderBytes))
    return Status::error(str(where, ": safetensors header declares ", header_len,
                             " bytes; expected at most ", SafetensorsFile::kMaxHeaderBytes));
  if (static_cast<int64_t>(header_len) > size - 8)
    return Status::error(str(where, ": truncated safetensors file: header declares ", header_len,
                             " bytes but the file has only ", size - 8, " after the length"));
  const char* header = reinterpret_cast<const char*>(base + 8);
  // The format: the header starts with '{' and may be padded at the end with spaces (0x20) only.
  // A NUL would end the parse early in some readers and not in others, so it is refused anywhere.
  if (header_len < 2 || header[0] != '{')
    return Status::error(
        str(where,
            ": safetensors header: expected a JSON object starting with '{' right after "
            "the 8-byte length"));
  if (const void* nul = std::memchr(header, 0, header_len))
    return Status::error(str(where, ": safetensors header has a NUL byte at offset ",
                             static_cast<const char*>(nul) - header,
                             "; expected JSON padded with trailing spaces only"));
  SP_ASSIGN_OR_RETURN(json h, parse_json_strict(std::string_view(header, header_len),
                                                where + ": safetensors header"));
  if (!h.is_object())
    return Status::error(str(where, ": safetensors header: expected a JSON object"));
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = static_cast<uint64_t>(size) - data_start;
  std::map<std::string, TensorInfo> tensors;
  std::vector<Span> spans;  // non-empty tensors, [begin, end) in the data area
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const json& t = it.value();
    auto bad = [&](const std::string& what) {
      return Status::error(str(where, ": tensor '", brief(name), "': ", what));
    };
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") ||
        !t.contains("data_offsets"))
      return bad("expected an object with dtype, shape and data_offsets");
    if (!t["dtype"].is_string()) return bad("dtype: expected a string");
    auto dt = dtype_from_name(t["dtype"].get<std::string>());
    if (!dt)
      return bad(str("unsupported dtype ", json_brief(t["dtype"]),
                     "; expected one of F32, BF16, F16, F8_E4M3, F8_E8M0, I8, I32, I64"));
    TensorInfo info;
    info.name = name;
    info.dtype = *dt;
    info.file = path;
    if (!t["shape"].is_array() || t["shape"].size() > kMaxRank)
      return bad(str("shape: expected an array of at most ", kMaxRank, " non-negative integers"));
    int64_t numel = 1;
    for (auto& d : t["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        return bad("shape: expected an array of non-negative integers");
      const int64_t v = d.get<int64_t>();
      if (!checked_mul(numel, v, &numel) || numel > (int64_t{1} << 50))
        return bad("shape: element count overflows");
      info.shape.push_back(v);
    }
    const json& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      return bad("data_offsets: expected [begin, end] with non-negative integers");
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e) return bad(str("data_offsets [", b, ", ", e, "]: begin after end"));
    if (e > data_size)
      return bad(str("data_offsets [", b, ", ", e, "] run past the end of the data area (",
                     data_size, " bytes): the file is truncated or the header is wrong"));
    const int64_t expect = numel * dtype_size(*dt);  // numel <= 2^50: no overflow
    if (static_cast<int64_t>(e - b) != expect)
      return bad(str("data_offsets span ", e - b, " bytes but ", dtype_name(*dt), " ",
                     shape_str(info.shape), " needs ", expect));
    info.data = base + data_start + b;
    info.nbytes = expect;
    auto [slot, inserted] = tensors.emplace(name, std::move(info));
    if (!inserted) return bad("appears twice in the header");  // parse_json_strict refuses first
    if (e > b) spans.push_back({b, e, &slot->first});
  }
  // Empty tensors occupy no bytes and are left out: one sorted between two overlapping tensors
  // must not hide the overlap.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      return Status::error(str(where, ": tensors '", brief(*spans[i - 1].name), "' and '",
                               brief(*spans[i].name), "' overlap in the data area"));
  return tensors;
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  SP_ASSIGN_OR_RETURN(int fd, open_regular_file(path, "safetensors file"));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return Status::error(str("cannot stat ", brief(path)));
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->size_ = st.st_size;
  if (f->size_ < 8) {
    ::close(fd);
    return Status::error(str(brief(path), ": truncated safetensors file: ", f->size_,
                             " bytes, expected at least the 8-byte header length"));
  }
  f->map_ = mmap(nullptr, static_cast<size_t>(f->size_), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return Status::error(str("cannot mmap ", brief(path), ": ", std::strerror(errno)));
  }
  SP_ASSIGN_OR_RETURN(f->tensors_,
                      parse_safetensors(static_cast<const uint8_t*>(f->map_), f->size_, path));
  return f;
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::from_bytes(std::string bytes,
                                                                     const std::string& name) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = name;
  f->owned_ = std::move(bytes);
  f->size_ = static_cast<int64_t>(f->owned_.size());
  SP_ASSIGN_OR_RETURN(
      f->tensors_,
      parse_safetensors(reinterpret_cast<const uint8_t*>(f->owned_.data()), f->size_, name));
  return f;
}

Result<SafetensorsIndex> parse_safetensors_index(std::string_view text, const std::string& source) {
  SP_ASSIGN_OR_RETURN(json idx, parse_json_strict(text, source));
  if (!idx.is_object() || !idx.contains("weight_map") || !idx["weight_map"].is_object())
    return Status::error(
        str(source, ": expected an object 'weight_map' from tensor name to shard file"));
  SafetensorsIndex out;
  std::set<std::string> seen;
  for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      return Status::error(
          str(source, ": weight_map['", brief(it.key()), "']: expected a file name"));
    std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard == "." || shard == ".." || shard.size() > 255 ||
        shard.find('/') != std::string::npos || shard.find('\0') != std::string::npos)
      return Status::error(str(source, ": weight_map['", brief(it.key()), "'] = '", brief(shard),
                               "': expected a file name inside the model directory"));
    out.weight_map[it.key()] = shard;
    if (seen.insert(shard).second) out.shards.push_back(shard);
  }
  if (out.shards.size() > kMaxShards)
    return Status::error(
        str(source, ": names ", out.shards.size(), " shard files; expected at most ", kMaxShards));
  return out;
}

Result<std::unique_ptr<Checkpoint>> Checkpoint::open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ck(new Checkpoint());
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;
  SP_ASSIGN_OR_RETURN(FileKind index_kind, probe_file(index_path));
  if (index_kind != FileKind::kMissing) {
    SP_ASSIGN_OR_RETURN(std::string text,
                        read_regular_file(index_path, kMaxIndexBytes, "safetensors index"));
    SP_ASSIGN_OR_RETURN(SafetensorsIndex idx, parse_safetensors_index(text, brief(index_path)));
    shard_names = std::move(idx.shards);
    weight_map = std::move(idx.weight_map);
    for (auto& s : shard_names) {
      SP_ASSIGN_OR_RETURN(FileKind k, probe_file(dir + "/" + s));
      if (k == FileKind::kMissing)
        return Status::error(str(brief(index_path), " names shard '", brief(s),
                                 "', which does not exist in ", brief(dir)));
    }
  } else {
    SP_ASSIGN_OR_RETURN(FileKind k, probe_file(dir + "/model.safetensors"));
    if (k == FileKind::kMissing)
      return Status::error(str("no checkpoint in ", brief(dir),
                               ": expected model.safetensors or model.safetensors.index.json"));
    shard_names.push_back("model.safetensors");
  }
  for (auto& s : shard_names) {
    SP_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open(dir + "/" + s));
    for (auto& [name, info] : f->tensors()) {
      if (ck->index_.count(name))
        return Status::error(str("tensor '", brief(name), "' appears in both ",
                                 brief(ck->index_[name]->file), " and ", brief(info.file)));
      if (!weight_map.empty()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end() || it->second != s)
          return Status::error(
              str(brief(dir), "/", brief(s), ": tensor '", brief(name),
                  "' is not mapped to this shard by model.safetensors.index.json"));
      }
      ck->index_[name] = &info;
    }
    ck->files_.push_back(std::move(f));
  }
  for (auto& [name, shard] : weight_map)
    if (!ck->index_.count(name))
      return Status::error(str("model.safetensors.index.json maps tensor '", brief(name), "' to ",
                               brief(shard), ", which does not contain it"));
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
