// config.json parsing in both styles, and every kind of bad config.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace sp
