// Hostile safetensors headers and checkpoints that do not match their config.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "model/safetensors.h"
#include "model/weights.h"
#include "tools/golden.h"

namespace sp {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("seekpipe_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
  static inline int counter_ = 0;
};

void write_raw(const std::string& path, uint64_t header_len, const std::string& header,
               size_t data_bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(&header_len), 8);
  f << header;
  std::string data(data_bytes, '\0');
  f << data;
}

std::string open_error(const std::string& path) {
  auto r = SafetensorsFile::open(path);
  EXPECT_FALSE(r.is_ok());
  return r.is_ok() ? "" : r.status().message();
}

TEST(Safetensors, ParsesGoodFile) {
  TempDir d;
  std::string h =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}})";
  write_raw(d.str() + "/m.safetensors", h.size(), h, 16);
  auto r = SafetensorsFile::open(d.str() + "/m.safetensors");
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ((*r)->tensors().size(), 2u);
  EXPECT_EQ((*r)->tensors().at("b").shape, (std::vector<int64_t>{2, 2}));
}

TEST(Safetensors, TruncatedFile) {
  TempDir d;
  std::string src = std::string(SP_TEST_DATA) + "/tiny/model.safetensors";
  std::ifstream in(src, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string p = d.str() + "/t.safetensors";
  std::ofstream(p, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  EXPECT_NE(open_error(p).find("past the end of the data area"), std::string::npos);
  std::ofstream(p, std::ios::binary).write(bytes.data(), 100);  // cut inside the header
  EXPECT_NE(open_error(p).find("truncated"), std::string::npos);
  std::ofstream(p, std::ios::binary).write(bytes.data(), 5);  // not even the length
  EXPECT_NE(open_error(p).find("truncated"), std::string::npos);
}

TEST(Safetensors, OffsetsPastTheEnd) {
  TempDir d;
  std::string h = R"({"a":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}})";
  write_raw(d.str() + "/m.safetensors", h.size(), h, 16);
  std::string e = open_error(d.str() + "/m.safetensors");
  EXPECT_NE(e.find("'a'"), std::string::npos) << e;
  EXPECT_NE(e.find("past the end"), std::string::npos) << e;
}

TEST(Safetensors, OverlappingTensors) {
  TempDir d;
  std::string h =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  write_raw(d.str() + "/m.safetensors", h.size(), h, 16);
  std::string e = open_error(d.str() + "/m.safetensors");
  EXPECT_NE(e.find("overlap"), std::string::npos) << e;
}

TEST(Safetensors, HugeHeaderSize) {
  TempDir d;
  write_raw(d.str() + "/m.safetensors", uint64_t{1} << 40, "{}", 0);
  std::string e = open_error(d.str() + "/m.safetensors");
  EXPECT_NE(e.find("header declares"), std::string::npos) << e;
}

TEST(Safetensors, SizeMustMatchDtypeTimesShape) {
  TempDir d;
  std::string h = R"({"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})";
  write_raw(d.str() + "/m.safetensors", h.size(), h, 8);
  EXPECT_NE(open_error(d.str() + "/m.safetensors").find("needs 6"), std::string::npos);
  h = R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})";
  write_raw(d.str() + "/m.safetensors", h.size(), h, 8);
  EXPECT_NE(open_error(d.str() + "/m.safetensors").find("unsupported dtype"), std::string::npos);
  h = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";  // broken JSON
  write_raw(d.str() + "/m.safetensors", h.size(), h, 8);
  EXPECT_NE(open_error(d.str() + "/m.safetensors").find("not valid JSON"), std::string::npos);
}

std::string bytes_error(const std::string& header, size_t data_bytes) {
  std::string b(8, '\0');
  uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  b += header + std::string(data_bytes, '\0');
  auto r = SafetensorsFile::from_bytes(b, "m.safetensors");
  EXPECT_FALSE(r.is_ok()) << header;
  return r.is_ok() ? "" : r.status().message();
}

TEST(Safetensors, DuplicateTensorNamesAreRefused) {
  // Last-wins would silently take the second entry's bytes.
  std::string e = bytes_error(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
      8);
  EXPECT_NE(e.find("duplicate key \"a\""), std::string::npos) << e;
}

TEST(Safetensors, OverlapHiddenByEmptyTensorsIsFound) {
  // Sorted: a [0,8), z1 [2,2), b [4,12), z2 [8,8): the empty tensors sit between the overlapping
  // ones, which an adjacent-pairs check that skips empty spans did not compare.
  std::string e = bytes_error(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z1":{"dtype":"I8","shape":[0],"data_offsets":[2,2]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"z2":{"dtype":"I8","shape":[0],"data_offsets":[8,8]}})",
      16);
  EXPECT_NE(e.find("overlap"), std::string::npos) << e;
  EXPECT_NE(e.find("'a' and 'b'"), std::string::npos) << e;
}

TEST(Safetensors, PaddingIsSpacesOnly) {
  const std::string h = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  // Trailing spaces are the format's padding: accepted.
  std::string b(8, '\0');
  std::string padded = h + std::string(7, ' ');
  uint64_t n = padded.size();
  std::memcpy(b.data(), &n, 8);
  auto ok = SafetensorsFile::from_bytes(b + padded + std::string(4, '\0'), "m");
  EXPECT_TRUE(ok.is_ok()) << ok.status().message();
  // NUL padding (some JSON readers stop at the NUL, others refuse): refused.
  EXPECT_NE(bytes_error(h + std::string(7, '\0'), 4).find("NUL byte at offset"), std::string::npos);
  // The header must start with '{'.
  EXPECT_NE(bytes_error(" " + h, 4).find("starting with '{'"), std::string::npos);
  // Deep nesting and long names in messages.
  std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_NE(bytes_error(deep, 0).find("nested more than"), std::string::npos);
  std::string e = bytes_error("{\"" + std::string(1 << 20, 'n') + "\":{\"dtype\":\"X\"}}", 0);
  EXPECT_LT(e.size(), 600u);
}

TEST(Safetensors, OnlyRegularFilesAreOpened) {
  TempDir d;
  const std::string fifo = d.str() + "/fifo.safetensors", dir = d.str() + "/dir.safetensors",
                    loop = d.str() + "/loop.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  fs::create_directory(dir);
  fs::create_symlink(d.str() + "/b", d.str() + "/a");
  fs::create_symlink(d.str() + "/a", d.str() + "/b");
  fs::create_symlink(d.str() + "/a", loop);
  EXPECT_NE(open_error(fifo).find("a FIFO; expected a regular file"), std::string::npos);
  EXPECT_NE(open_error(dir).find("a directory; expected a regular file"), std::string::npos);
  EXPECT_NE(open_error("/dev/zero").find("character device"), std::string::npos);
  EXPECT_NE(open_error(loop).find("symbolic links"), std::string::npos);
}

TEST(Checkpoint, SpecialFilesAreErrorsNotExceptions) {
  // A link loop used to escape as std::filesystem::filesystem_error.
  for (const char* name : {"model.safetensors", "model.safetensors.index.json"}) {
    TempDir d;
    fs::create_symlink(d.str() + "/b", d.str() + "/a");
    fs::create_symlink(d.str() + "/a", d.str() + "/b");
    fs::create_symlink(d.str() + "/a", d.str() + "/" + name);
    auto r = Checkpoint::open(d.str());
    ASSERT_FALSE(r.is_ok()) << name;
    EXPECT_NE(r.status().message().find("symbolic links"), std::string::npos)
        << r.status().message();
  }
  TempDir d;
  ASSERT_EQ(::mkfifo((d.str() + "/model.safetensors.index.json").c_str(), 0600), 0);
  auto r = Checkpoint::open(d.str());
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("FIFO"), std::string::npos) << r.status().message();
}

TEST(Checkpoint, IndexIsStrict) {
  auto err = [](const std::string& text) {
    auto r = parse_safetensors_index(text, "index.json");
    EXPECT_FALSE(r.is_ok()) << text;
    return r.is_ok() ? "" : r.status().message();
  };
  EXPECT_NE(err(R"({"weight_map":{"a":"x.safetensors","a":"y.safetensors"}})").find("duplicate"),
            std::string::npos);
  for (const char* shard : {"", ".", "..", "../x", "a/b"})
    EXPECT_NE(err(str(R"({"weight_map":{"a":")", shard, R"("}})")).find("expected a file name"),
              std::string::npos)
        << shard;
  EXPECT_NE(err(std::string(100000, '[')).find("nested"), std::string::npos);
  auto ok = parse_safetensors_index(
      R"({"metadata":{},"weight_map":{"a":"x.safetensors","b":"y.safetensors","c":"x.safetensors"}})",
      "index.json");
  ASSERT_TRUE(ok.is_ok()) << ok.status().message();
  EXPECT_EQ(ok->shards, (std::vector<std::string>{"x.safetensors", "y.safetensors"}));
}

// Copies the tiny fixture with `edit` applied to its tensor list.
std::string edited_tiny(
    const TempDir& d,
    const std::function<void(std::vector<TensorInfo>&, std::vector<std::vector<uint8_t>>&)>& edit) {
  fs::copy_file(std::string(SP_TEST_DATA) + "/tiny/config.json", d.str() + "/config.json");
  auto f = SafetensorsFile::open(std::string(SP_TEST_DATA) + "/tiny/model.safetensors");
  EXPECT_TRUE(f.is_ok());
  std::vector<TensorInfo> ts;
  for (auto& [n, t] : (*f)->tensors()) ts.push_back(t);
  std::vector<std::vector<uint8_t>> extra;
  extra.reserve(8);
  edit(ts, extra);
  EXPECT_TRUE(write_safetensors(d.str() + "/model.safetensors", ts).is_ok());
  return d.str();
}

std::string load_error(const std::string& dir) {
  auto c = load_config(dir);
  EXPECT_TRUE(c.is_ok());
  auto w = load_weights(*c, dir, LoadPlan::whole(*c), nullptr);
  EXPECT_FALSE(w.is_ok());
  return w.is_ok() ? "" : w.status().message();
}

TEST(Checkpoint, MissingTensorIsListed) {
  TempDir d;
  auto dir = edited_tiny(d, [](auto& ts, auto&) {
    std::erase_if(ts, [](const TensorInfo& t) { return t.name == "layers.3.attn.wq_b.weight"; });
  });
  std::string e = load_error(dir);
  EXPECT_NE(e.find("missing tensors (1)"), std::string::npos) << e;
  EXPECT_NE(e.find("layers.3.attn.wq_b.weight"), std::string::npos) << e;
}

TEST(Checkpoint, WrongShapeIsListed) {
  TempDir d;
  auto dir = edited_tiny(d, [](auto& ts, auto&) {
    for (auto& t : ts)
      if (t.name == "layers.1.attn.wkv.weight") t.shape = {64, 32};  // transposed
  });
  std::string e = load_error(dir);
  EXPECT_NE(e.find("layers.1.attn.wkv.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("expected shape [32, 64]"), std::string::npos) << e;
}

TEST(Checkpoint, UnexpectedTensorIsListed) {
  TempDir d;
  auto dir = edited_tiny(d, [](auto& ts, auto& extra) {
    extra.push_back(std::vector<uint8_t>(16));
    TensorInfo t;
    t.name = "layers.9.attn.wq_a.weight";
    t.dtype = DType::kF32;
    t.shape = {4};
    t.data = extra.back().data();
    t.nbytes = 16;
    ts.push_back(t);
  });
  std::string e = load_error(dir);
  EXPECT_NE(e.find("unexpected tensors"), std::string::npos) << e;
  EXPECT_NE(e.find("layers.9.attn.wq_a.weight"), std::string::npos) << e;
}

TEST(Checkpoint, IndexNamesMissingShard) {
  TempDir d;
  for (auto& e : fs::directory_iterator(std::string(SP_TEST_DATA) + "/small"))
    fs::copy_file(e.path(), d.str() + "/" + e.path().filename().string());
  fs::remove(d.str() + "/model-00002-of-00003.safetensors");
  auto c = load_config(d.str());
  ASSERT_TRUE(c.is_ok());
  auto w = load_weights(*c, d.str(), LoadPlan::whole(*c), nullptr);
  ASSERT_FALSE(w.is_ok());
  EXPECT_NE(w.status().message().find("model-00002-of-00003.safetensors"), std::string::npos)
      << w.status().message();
  EXPECT_NE(w.status().message().find("does not exist"), std::string::npos) << w.status().message();
}

TEST(Checkpoint, Tid2eidOutOfRange) {
  TempDir d;
  std::vector<uint8_t> bad;
  auto dir = edited_tiny(d, [&](auto& ts, auto& extra) {
    for (auto& t : ts)
      if (t.name == "layers.0.ffn.gate.tid2eid") {
        extra.emplace_back(t.data, t.data + t.nbytes);
        int64_t v = 99;
        std::memcpy(extra.back().data(), &v, 8);  // I64 in the fixture
        t.data = extra.back().data();
      }
  });
  std::string e = load_error(dir);
  EXPECT_NE(e.find("tid2eid"), std::string::npos) << e;
}

// A token routed twice to one expert: the hash-routing table must name distinct experts per
// token, as a top-k does (the CUDA MoE sizes its per-expert work on that).
TEST(Checkpoint, Tid2eidRepeatsAnExpert) {
  TempDir d;
  auto dir = edited_tiny(d, [&](auto& ts, auto& extra) {
    for (auto& t : ts)
      if (t.name == "layers.0.ffn.gate.tid2eid") {
        extra.emplace_back(t.data, t.data + t.nbytes);
        std::memcpy(extra.back().data() + 8, extra.back().data(), 8);  // [0][1] = [0][0] (I64)
        t.data = extra.back().data();
      }
  });
  std::string e = load_error(dir);
  EXPECT_NE(e.find("twice"), std::string::npos) << e;
  EXPECT_NE(e.find("layers.0.ffn.gate.tid2eid[0]"), std::string::npos) << e;
}

TEST(Checkpoint, Tid2eidIsCheckedBeforeNarrowing) {
  TempDir d;
  auto dir = edited_tiny(d, [&](auto& ts, auto& extra) {
    for (auto& t : ts)
      if (t.name == "layers.0.ffn.gate.tid2eid") {
        extra.emplace_back(t.data, t.data + t.nbytes);
        int64_t v = (int64_t{1} << 32) + 1;  // int32 narrowing makes this expert 1
        std::memcpy(extra.back().data(), &v, 8);
        t.data = extra.back().data();
      }
  });
  std::string e = load_error(dir);
  EXPECT_NE(e.find("4294967297"), std::string::npos) << e;
}

TEST(Golden, TokenIdsAreCheckedAsInt64) {
  std::ifstream in(std::string(SP_TEST_DATA) + "/tiny/golden.safetensors", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto c = load_config(std::string(SP_TEST_DATA) + "/tiny");
  ASSERT_TRUE(c.is_ok());
  auto g = SafetensorsFile::from_bytes(bytes, "golden");
  ASSERT_TRUE(g.is_ok());
  ASSERT_TRUE(read_golden(**g, *c).is_ok());
  // Patch the first id to 2^32 + 5 (int32 narrowing makes it token 5).
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  auto h = nlohmann::json::parse(bytes.substr(8, header_len));
  const uint64_t off = 8 + header_len + h["p0.input_ids"]["data_offsets"][0].get<uint64_t>();
  const int64_t wide = (int64_t{1} << 32) + 5;
  std::memcpy(bytes.data() + off, &wide, 8);
  auto g2 = SafetensorsFile::from_bytes(bytes, "golden");
  ASSERT_TRUE(g2.is_ok());
  auto r = read_golden(**g2, *c);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("4294967301"), std::string::npos) << r.status().message();
}

TEST(Checkpoint, QuantisedFixtureKeepsFormats) {
  std::string dir = std::string(SP_TEST_DATA) + "/tinyq";
  auto c = load_config(dir);
  ASSERT_TRUE(c.is_ok());
  auto w = load_weights(*c, dir, LoadPlan::whole(*c), nullptr);
  ASSERT_TRUE(w.is_ok()) << w.status().message();
  const LayerWeights& L = (*w)->layer(1);
  EXPECT_EQ(L.wq_a.format, WeightFormat::kFP8);
  EXPECT_EQ(L.w1[0].format, WeightFormat::kFP4);
  EXPECT_EQ(L.wq_a.nbytes(), 192 * 256 + 2 * 2);
  EXPECT_EQ((*w)->stats.mtp_tensors.size(), 87u);
}

}  // namespace
}  // namespace sp

namespace sp {
namespace {

// Random corruptions of a real header and of a config: every one is an error or a valid parse,
// never a crash (run under the test's own process, so a crash fails the suite).
TEST(Hostile, MutatedHeadersAndConfigsNeverCrash) {
  std::ifstream in(std::string(SP_TEST_DATA) + "/tiny/model.safetensors", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  std::ifstream cin_(std::string(SP_TEST_DATA) + "/small/config.json");
  std::string config((std::istreambuf_iterator<char>(cin_)), std::istreambuf_iterator<char>());
  TempDir d;
  const std::string path = d.str() + "/m.safetensors";
  std::mt19937 rng(12345);
  const char alphabet[] = "0123456789-.,:[]{}\"eE tfnuaFIB8_";
  int errors = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string b = bytes;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t pos = 8 + rng() % header_len;
      b[pos] = alphabet[rng() % (sizeof(alphabet) - 1)];
    }
    std::ofstream(path, std::ios::binary).write(b.data(), static_cast<std::streamsize>(b.size()));
    auto r = SafetensorsFile::open(path);
    errors += !r.is_ok();
    std::string c = config;
    for (int e = 0; e < edits; ++e) c[rng() % c.size()] = alphabet[rng() % (sizeof(alphabet) - 1)];
    auto pc = parse_config(c, "config.json");
    errors += !pc.is_ok();
  }
  EXPECT_GT(errors, 100);  // most corruptions are caught (some land in harmless places)
}

}  // namespace
}  // namespace sp
