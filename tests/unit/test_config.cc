// config.json parsing in both styles, and every kind of bad config.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/config.h"
#include "model/model.h"

namespace sp {
namespace {

using nlohmann::json;

json read_json(const std::string& rel) {
  std::ifstream f(std::string(SP_TEST_DATA) + "/" + rel);
  return json::parse(f);
}

std::string parse_error(const json& j) {
  auto r = parse_config(j.dump(), "config.json");
  EXPECT_FALSE(r.is_ok());
  return r.is_ok() ? "" : r.status().message();
}

TEST(Config, FixturesParse) {
  auto tiny = load_config(std::string(SP_TEST_DATA) + "/tiny");
  ASSERT_TRUE(tiny.is_ok()) << tiny.status().message();
  EXPECT_EQ(tiny->style, ConfigStyle::kHuggingFace);
  EXPECT_EQ(tiny->compress_ratio, (std::vector<int>{0, 16, 4, 16, 4}));
  EXPECT_EQ(tiny->rope_dim, 8);
  EXPECT_EQ(tiny->mlp_kinds[1], MlpKind::kHashMoe);
  EXPECT_EQ(tiny->mlp_kinds[2], MlpKind::kMoe);
  EXPECT_FALSE(tiny->rope_compress.yarn);

  auto small = load_config(std::string(SP_TEST_DATA) + "/small");
  ASSERT_TRUE(small.is_ok()) << small.status().message();
  EXPECT_EQ(small->style, ConfigStyle::kUpstream);
  EXPECT_EQ(small->compress_ratio, (std::vector<int>{128, 128, 128, 4, 128, 4}));
  EXPECT_EQ(small->attn_kinds[3], AttnKind::kCSA);
  EXPECT_TRUE(small->rope_compress.yarn);
  EXPECT_FALSE(small->rope_main.yarn);
  EXPECT_EQ(small->mlp_kinds[2], MlpKind::kHashMoe);
  EXPECT_EQ(small->mlp_kinds[3], MlpKind::kMoe);

  auto q = load_config(std::string(SP_TEST_DATA) + "/tinyq");
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  EXPECT_EQ(q->linear_format, WeightFormat::kFP8);
  EXPECT_EQ(q->expert_format, WeightFormat::kFP4);
}

TEST(Config, ReleasedConfigsParse) {
  for (const char* m : {"configs/deepseek-v4-flash", "configs/deepseek-v4-pro"}) {
    auto c = load_config(std::string(SP_TEST_DATA) + "/" + m);
    ASSERT_TRUE(c.is_ok()) << m << ": " << c.status().message();
    EXPECT_EQ(c->expert_format, WeightFormat::kFP4);
  }
  auto flash = load_config(std::string(SP_TEST_DATA) + "/configs/deepseek-v4-flash");
  EXPECT_EQ(flash->num_layers, 43);
  EXPECT_EQ(flash->num_layers_of(AttnKind::kCSA), 21);
  EXPECT_EQ(flash->num_layers_of(AttnKind::kHCA), 20);
  EXPECT_EQ(flash->num_layers_of(AttnKind::kSliding), 2);
  auto pro = load_config(std::string(SP_TEST_DATA) + "/configs/deepseek-v4-pro");
  EXPECT_EQ(pro->num_layers, 61);
  EXPECT_EQ(pro->num_layers_of(AttnKind::kSliding), 0);
}

TEST(Config, YarnRampMatchesSpec) {
  // For base 160000 and 64 rope dims the ramp runs from pair 15 to 25 (model_spec 1.3).
  auto flash = load_config(std::string(SP_TEST_DATA) + "/configs/deepseek-v4-flash");
  std::vector<float> t = rope_inv_freq(flash->rope_compress, 64);
  std::vector<float> plain = rope_inv_freq(RopeParams{160000.0}, 64);
  for (int i = 0; i <= 15; ++i) EXPECT_FLOAT_EQ(t[i], plain[i]) << i;
  for (int i = 25; i < 32; ++i) EXPECT_FLOAT_EQ(t[i], plain[i] / 16) << i;
  EXPECT_LT(t[20], plain[20]);
  EXPECT_GT(t[20], plain[20] / 16);
}

TEST(Config, IgnoresUnusedKeysAndReportsThem) {
  auto c = load_config(std::string(SP_TEST_DATA) + "/tiny");
  ASSERT_TRUE(c.is_ok());
  bool found = false;
  for (auto& k : c->ignored_keys) found |= k == "router_aux_loss_coef";
  EXPECT_TRUE(found);
}

TEST(Config, MissingFieldIsNamed) {
  json j = read_json("tiny/config.json");
  j.erase("hidden_size");
  EXPECT_NE(parse_error(j).find("'hidden_size'"), std::string::npos);
  j = read_json("small/config.json");
  j.erase("num_hash_layers");
  EXPECT_NE(parse_error(j).find("'num_hash_layers'"), std::string::npos);
  j = read_json("small/config.json");
  j.erase("compress_ratios");
  EXPECT_NE(parse_error(j).find("compress_ratios"), std::string::npos);
}

TEST(Config, InconsistentOrUnknownValuesAreNamed) {
  json j = read_json("tiny/config.json");
  j["layer_types"][1] = "linear_attention";
  std::string e = parse_error(j);
  EXPECT_NE(e.find("layer_types[1]"), std::string::npos) << e;
  EXPECT_NE(e.find("heavily_compressed_attention"), std::string::npos) << e;

  j = read_json("tiny/config.json");
  j["layer_types"].erase(0);
  EXPECT_NE(parse_error(j).find("'layer_types'"), std::string::npos);

  j = read_json("tiny/config.json");
  j["scoring_func"] = "softmax";
  EXPECT_NE(parse_error(j).find("sqrtsoftplus"), std::string::npos);

  j = read_json("tiny/config.json");
  j["rope_parameters"]["compress"]["rope_type"] = "dynamic";
  EXPECT_NE(parse_error(j).find("rope_parameters.compress.rope_type"), std::string::npos);

  j = read_json("tiny/config.json");
  j["o_groups"] = 3;
  EXPECT_NE(parse_error(j).find("'o_groups'"), std::string::npos);

  j = read_json("tiny/config.json");
  j["compress_rates"]["heavily_compressed_attention"] = 0;
  EXPECT_NE(parse_error(j).find("compress_rates.heavily_compressed_attention"), std::string::npos);

  j = read_json("small/config.json");
  j["compress_ratios"][2] = 64;
  e = parse_error(j);
  EXPECT_NE(e.find("compress_ratios[2]"), std::string::npos) << e;
  EXPECT_NE(e.find("128"), std::string::npos) << e;

  j = read_json("small/config.json");
  j["compress_ratios"].erase(6);
  EXPECT_NE(parse_error(j).find("num_hidden_layers + 1"), std::string::npos);

  j = read_json("small/config.json");
  j["num_experts_per_tok"] = 99;
  EXPECT_NE(parse_error(j).find("num_experts_per_tok"), std::string::npos);

  j = read_json("small/config.json");
  j["hidden_size"] = "wide";
  EXPECT_NE(parse_error(j).find("'hidden_size'"), std::string::npos);

  EXPECT_FALSE(parse_config("{not json", "config.json").is_ok());
}

// Every released and bundled config lies inside the documented ranges.
TEST(Config, EveryBundledAndReleasedConfigIsInRange) {
  for (const char* m :
       {"tiny", "small", "tinyq", "configs/deepseek-v4-flash", "configs/deepseek-v4-pro",
        "configs/flash-mini", "configs/flash-mini-base"}) {
    auto c = load_config(std::string(SP_TEST_DATA) + "/" + m);
    EXPECT_TRUE(c.is_ok()) << m << ": " << c.status().message();
  }
}

// Integers that used to wrap when narrowed, and values outside the documented ranges.
TEST(Config, OutOfRangeValuesAreRefused) {
  struct Case {
    const char* field;
    json value;
  };
  const std::vector<Case> cases = {
      {"num_hidden_layers", json((int64_t{1} << 32) + 5)},
      {"hidden_size", json(int64_t{1} << 31)},
      {"hc_mult", json(100000)},
      {"hc_mult", json(17)},
      {"index_topk", json(int64_t{2147483647})},
      {"hc_sinkhorn_iters", json(int64_t{2147483647})},
      {"n_routed_experts", json(int64_t{2147483647})},
      {"vocab_size", json(uint64_t{9223372036854775808ull})},
      {"rms_norm_eps", json(1e30)},
      {"rms_norm_eps", json(1e-300)},
      {"hc_eps", json(1e30)},
      {"routed_scaling_factor", json(1e30)},
      {"swiglu_limit", json(1e30)},
      {"eos_token_id", json(int64_t{1} << 40)},
      {"eos_token_id", json(256)},  // tiny's vocabulary is 256
      {"num_nextn_predict_layers", json(1000)},
      {"max_position_embeddings", json(int64_t{1} << 40)},
  };
  for (const Case& k : cases) {
    json j = read_json("tiny/config.json");
    j[k.field] = k.value;
    std::string e = parse_error(j);
    EXPECT_NE(e.find(str("'", k.field, "'")), std::string::npos) << k.field << ": " << e;
    EXPECT_NE(e.find(" in "), std::string::npos) << k.field << ": " << e;
  }
  json j = read_json("tiny/config.json");
  j["compress_rates"]["heavily_compressed_attention"] = (int64_t{1} << 32) + 16;
  EXPECT_NE(parse_error(j).find("compress_rates.heavily_compressed_attention"), std::string::npos);
  j = read_json("small/config.json");
  j["compress_ratios"][0] = (int64_t{1} << 32) + 4;  // was read as int: 4
  EXPECT_NE(parse_error(j).find("compress_ratios[0]"), std::string::npos);
  j = read_json("small/config.json");
  j["rope_theta"] = 1e300;
  EXPECT_NE(parse_error(j).find("'rope_theta'"), std::string::npos);
  j = read_json("small/config.json");
  j["rope_scaling"]["factor"] = 1e9;
  EXPECT_NE(parse_error(j).find("rope_scaling.factor"), std::string::npos);
}

TEST(Config, TotalsAreBounded) {
  // Each field in range, but together more tensors than the table may hold.
  json j = read_json("small/config.json");
  j["n_routed_experts"] = 4096;
  j["num_hidden_layers"] = 1024;
  j["compress_ratios"] = json::array();
  for (int l = 0; l <= 1024; ++l) j["compress_ratios"].push_back(0);
  EXPECT_NE(parse_error(j).find("tensors"), std::string::npos);
  j = read_json("small/config.json");
  j["hidden_size"] = 65536;
  j["moe_intermediate_size"] = 65536;
  j["n_routed_experts"] = 4096;
  EXPECT_NE(parse_error(j).find("weight elements"), std::string::npos);
}

TEST(Config, HostileJsonIsRefused) {
  std::string text = read_json("tiny/config.json").dump();
  // Duplicate keys: last-wins parsers would read hc_mult 8, first-wins ones 4.
  std::string dup = "{\"hc_mult\": 8, " + text.substr(1);
  auto r = parse_config(dup, "config.json");
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("duplicate key \"hc_mult\""), std::string::npos);
  // Deep nesting, also inside a field whose error message would print the value.
  std::string deep = std::string(100000, '[') + std::string(100000, ']');
  r = parse_config(deep, "config.json");
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("nested more than"), std::string::npos);
  json j = read_json("tiny/config.json");
  std::string field = j.dump();
  field.replace(field.find("\"hc_mult\":4"), 11, "\"hc_mult\":" + deep);
  r = parse_config(field, "config.json");
  ASSERT_FALSE(r.is_ok());
  EXPECT_LT(r.status().message().size(), 400u);
  // A long value is echoed truncated.
  j["hc_mult"] = std::string(1 << 20, 'x');
  std::string e = parse_error(j);
  EXPECT_NE(e.find("'hc_mult'"), std::string::npos);
  EXPECT_LT(e.size(), 400u);
}

TEST(Config, OnlyRegularFilesOfBoundedSizeAreRead) {
  namespace fs = std::filesystem;
  fs::path d = fs::temp_directory_path() / ("sp_cfg_" + std::to_string(::getpid()));
  fs::remove_all(d);
  for (const char* kind : {"fifo", "dir", "dev", "loop", "huge"}) {
    fs::path m = d / kind;
    fs::create_directories(m);
    fs::path c = m / "config.json";
    if (std::string(kind) == "fifo") {
      ASSERT_EQ(::mkfifo(c.c_str(), 0600), 0);
    }
    if (std::string(kind) == "dir") fs::create_directory(c);
    if (std::string(kind) == "dev") fs::create_symlink("/dev/zero", c);
    if (std::string(kind) == "loop") {
      fs::create_symlink(m / "b", m / "a");
      fs::create_symlink(m / "a", m / "b");
      fs::create_symlink(m / "a", c);
    }
    if (std::string(kind) == "huge") std::ofstream(c) << std::string(kMaxConfigBytes + 1, ' ');
    auto r = load_config(m.string());  // must return, not block or throw
    ASSERT_FALSE(r.is_ok()) << kind;
    EXPECT_NE(r.status().message().find("config.json"), std::string::npos)
        << kind << ": " << r.status().message();
  }
  fs::remove_all(d);
}

}  // namespace
}  // namespace sp
