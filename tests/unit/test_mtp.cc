// The MTP draft layer against mtp_golden.safetensors of every fixture and of the trained FP8
// model, in one step and in chunks that carry its window ring across steps; loading it only when
// asked; the errors of --speculative mtp; DSpark releases loading as plain V4.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/engine.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "parallel/topology.h"
#include "tools/golden.h"
#include "tools/mtp_check.h"

namespace sp {
namespace {

std::string model_dir(const std::string& name) {
  if (name.rfind("kjv", 0) == 0) return std::string(SP_TEST_MODELS) + "/" + name;
  return std::string(SP_TEST_DATA) + "/" + name;
}

// Max abs error of the MTP logits of every golden prompt, all prompts in each step with at most
// `chunk` positions of each.
double mtp_error(const std::string& name, int chunk, int threads) {
  const std::string dir = model_dir(name);
  Config c = load_config(dir).value();
  auto w = load_weights(c, dir, LoadPlan::whole(c, true), nullptr);
  EXPECT_TRUE(w.is_ok()) << w.status().message();
  auto gfile = std::move(SafetensorsFile::open(dir + "/golden.safetensors").value());
  auto prompts = read_golden(*gfile, c).value();
  auto mfile = std::move(SafetensorsFile::open(dir + "/mtp_golden.safetensors").value());
  auto want = read_mtp_golden(*mfile, prompts, c);
  EXPECT_TRUE(want.is_ok()) << want.status().message();
  std::vector<std::vector<int32_t>> seqs;
  int64_t longest = 0;
  for (const GoldenPrompt& g : prompts) {
    seqs.push_back(g.ids);
    seqs.back().insert(seqs.back().end(), g.greedy.begin(), g.greedy.end());
    longest = std::max<int64_t>(longest, static_cast<int64_t>(seqs.back().size()));
  }
  const int S = static_cast<int>(seqs.size());
  const int step = std::min<int>(chunk, static_cast<int>(longest));
  auto be = make_cpu_backend(threads, 1);
  StateLimits lim{S, longest, step * S, step * S};
  lim.residual_buffers = 2;
  lim.mtp = true;
  Model m(c, **w, *be, lim);
  EXPECT_TRUE(m.has_mtp());
  const auto got = run_mtp_teacher_forced(m, seqs, step);
  const int64_t V = c.vocab_size;
  double err = 0;
  for (int i = 0; i < S; ++i)
    for (size_t k = 0; k < got[i].size(); ++k)
      err = std::max(err, static_cast<double>(std::fabs(got[i][k] - (*want)[i][k])));
  EXPECT_EQ(got[0].size(), (seqs[0].size() - 1) * static_cast<size_t>(V));
  return err;
}

class MtpGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(MtpGolden, OneStepMatchesGolden) {
  const double err = mtp_error(GetParam(), 1 << 20, 2);
  EXPECT_LE(err, 5e-5);
  std::printf("%s: MTP max abs error %.3e (one step)\n", GetParam().c_str(), err);
}

// Chunks of 7 positions: smaller than every window here, so each step's MTP attention reads rows
// that earlier steps left in the MTP layer's own window ring.
TEST_P(MtpGolden, ChunksOfSevenMatchGolden) {
  const double err = mtp_error(GetParam(), 7, 2);
  EXPECT_LE(err, 5e-5);
  std::printf("%s: MTP max abs error %.3e (chunks of 7)\n", GetParam().c_str(), err);
}

INSTANTIATE_TEST_SUITE_P(Models, MtpGolden,
                         ::testing::Values("tiny", "small", "tinyq", "kjv-v4-tiny-fp8"),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

// Chained drafts feed the MTP layer its own output: X_in and X_out may be one buffer. The same
// step run in place gives the same bits as with two buffers (rerunning a step rewrites its window
// rows with the same values, so the second run sees the same state).
TEST(MtpForward, InPlaceEqualsSeparateBuffers) {
  const std::string dir = model_dir("tiny");
  Config c = load_config(dir).value();
  auto w = std::move(load_weights(c, dir, LoadPlan::whole(c, true), nullptr).value());
  auto be = make_cpu_backend(2);
  StateLimits lim{1, 64, 16, 16};
  lim.residual_buffers = 2;
  lim.mtp = true;
  Model m(c, *w, *be, lim);
  BatchView b;
  b.num_tokens = 10;
  for (int i = 0; i < 10; ++i) {
    b.token_ids.push_back(3 + 7 * i);
    b.positions.push_back(i);
    b.chunk_of.push_back(0);
    b.logit_rows.push_back(i);
  }
  SeqChunk ch;
  ch.n_tokens = 10;
  ch.num_blocks = 1;
  b.chunks.push_back(ch);
  b.block_tables.push_back(0);
  Tensor X = m.residual(0, 10);
  m.begin_step(b);
  m.embed(b, X);
  m.run_layers(b, X);
  const int64_t V = c.vocab_size, W = c.hc_dim();
  Tensor a = m.residual(1, 10), out = m.mtp_streams(10);
  be->copy(X, a);
  std::vector<float> sep(static_cast<size_t>(10 * V)), inplace(sep.size()), streams(10 * W),
      streams2(10 * W);
  be->to_host(m.mtp_forward(b, X, out), sep.data());
  be->to_host(out, streams.data());
  be->to_host(m.mtp_forward(b, a, a), inplace.data());
  be->to_host(a, streams2.data());
  EXPECT_EQ(0, std::memcmp(sep.data(), inplace.data(), sep.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(streams.data(), streams2.data(), streams.size() * sizeof(float)));
}

TEST(MtpLoading, OnlyWhenAskedAndCounted) {
  const std::string dir = model_dir("tinyq");
  Config c = load_config(dir).value();
  auto off = std::move(load_weights(c, dir, LoadPlan::whole(c), nullptr).value());
  auto on = std::move(load_weights(c, dir, LoadPlan::whole(c, true), nullptr).value());
  // Off: unchanged (the mtp.* tensors listed, none read). On: every mtp.0.* tensor read.
  auto ck = std::move(Checkpoint::open(dir).value());
  size_t mtp = 0;
  int64_t mtp_bytes = 0;
  for (auto& [name, info] : ck->all())
    if (name.rfind("mtp.0.", 0) == 0) {
      ++mtp;
      mtp_bytes += info->nbytes;
    }
  ASSERT_GT(mtp, 0u);
  EXPECT_EQ(off->stats.mtp_tensors.size(), mtp);
  EXPECT_TRUE(on->stats.mtp_tensors.empty());
  EXPECT_EQ(on->stats.tensors, off->stats.tensors + static_cast<int64_t>(mtp));
  EXPECT_EQ(on->stats.bytes, off->stats.bytes + mtp_bytes);
  for (auto& name : off->stats.accessed) EXPECT_NE(name.rfind("mtp.", 0), 0u) << name;
  // The table with the MTP layer: the same storage bytes as the checkpoint's mtp.0.* tensors.
  int64_t table = 0;
  for (const ExpectedTensor& t : expected_tensors(c, true))
    if (t.part == Part::kMtp) table += expected_bytes(t);
  EXPECT_EQ(table, mtp_bytes);
  // Without the MTP layer's weights the model has no draft; the state grows by one window ring.
  auto be = make_cpu_backend(1);
  StateLimits lim{2, 64, 16, 2};
  Model plain(c, *off, *be, lim);
  EXPECT_FALSE(plain.has_mtp());
  lim.mtp = true;
  Model with(c, *on, *be, lim);
  EXPECT_TRUE(with.has_mtp());
  EXPECT_EQ(with.state_bytes() - plain.state_bytes(),
            int64_t{2} * c.sliding_window * c.head_dim * 4);
  // Dummy weights build the MTP layer too.
  auto dummy = dummy_weights(c, LoadPlan::whole(c, true), 1, nullptr);
  ASSERT_TRUE(dummy.is_ok());
  EXPECT_EQ((*dummy)->mtp.block.index, c.num_layers);
  EXPECT_TRUE((*dummy)->mtp.e_proj.valid());
}

// The pipeline plan counts the MTP layer, its state and the embedding copy on the last stage only.
TEST(MtpLoading, PipelinePlanCountsTheDraftLayerOnTheLastStage) {
  Config c = load_config(model_dir("tinyq")).value();
  const std::vector<int> part = vllm_partition(c.num_layers, 2);
  const auto off = stage_costs(c, part, CostModelOptions{4, 256, false});
  const auto on = stage_costs(c, part, CostModelOptions{4, 256, true});
  int64_t mtp = 0, embed = 0;
  for (const ExpectedTensor& t : expected_tensors(c, true)) {
    if (t.part == Part::kMtp) mtp += expected_bytes(t);
    if (t.part == Part::kEmbed) embed += expected_bytes(t);
  }
  ASSERT_GT(mtp, 0);
  EXPECT_EQ(on[0].weight_bytes, off[0].weight_bytes);
  EXPECT_EQ(on[0].state_per_seq, off[0].state_per_seq);
  EXPECT_EQ(on[1].weight_bytes, off[1].weight_bytes + mtp + embed);
  EXPECT_EQ(on[1].state_per_seq,
            off[1].state_per_seq + layer_state_bytes(c, c.num_layers).per_sequence);
  EXPECT_EQ(layer_state_bytes(c, c.num_layers).per_sequence,
            int64_t{c.sliding_window} * c.head_dim * 4);
  EXPECT_GT(on[1].time, off[1].time);
}

// A directory holding `config` as config.json and the given tensors as model.safetensors.
std::string write_model(const std::string& name, const nlohmann::json& config,
                        const std::vector<TensorInfo>& tensors) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / str("sp_test_mtp_", getpid(), "_", name);
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config.dump(2);
  EXPECT_TRUE(write_safetensors((dir / "model.safetensors").string(), tensors).is_ok());
  return dir.string();
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

TEST(MtpLoading, ErrorsNameWhatIsMissing) {
  const std::string src = model_dir("tiny");
  auto ck = std::move(Checkpoint::open(src).value());
  std::vector<TensorInfo> main;
  for (auto& [name, info] : ck->all())
    if (name.rfind("mtp.", 0) != 0) main.push_back(*info);
  nlohmann::json cfg = read_json(src + "/config.json");
  // No mtp.* tensors at all.
  const std::string bare = write_model("bare", cfg, main);
  Config c = load_config(bare).value();
  EXPECT_TRUE(load_weights(c, bare, LoadPlan::whole(c), nullptr).is_ok());
  auto r = load_weights(c, bare, LoadPlan::whole(c, true), nullptr);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("no mtp.0.* tensors"), std::string::npos)
      << r.status().message();
  // Some missing: listed by name.
  std::vector<TensorInfo> partial = main;
  for (auto& [name, info] : ck->all())
    if (name.rfind("mtp.0.", 0) == 0 && name != "mtp.0.e_proj.weight") partial.push_back(*info);
  const std::string half = write_model("half", cfg, partial);
  r = load_weights(c, half, LoadPlan::whole(c, true), nullptr);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("mtp.0.e_proj.weight"), std::string::npos)
      << r.status().message();
  // num_nextn_predict_layers 0.
  cfg["num_nextn_predict_layers"] = 0;
  Config none = parse_config(cfg.dump(), "config.json").value();
  Status st = check_mtp_config(none);
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("num_nextn_predict_layers"), std::string::npos);
  EXPECT_FALSE(load_weights(none, src, LoadPlan::whole(none, true), nullptr).is_ok());
  EXPECT_FALSE(dummy_weights(none, LoadPlan::whole(none, true), 0, nullptr).is_ok());
  std::filesystem::remove_all(bare);
  std::filesystem::remove_all(half);
}

// small's config as a DSpark release: dspark_* keys and compress_ratios with three draft entries.
nlohmann::json dspark_config() {
  nlohmann::json cfg = read_json(model_dir("small") + "/config.json");
  cfg["dspark_block_size"] = 4;
  cfg["dspark_target_layer_ids"] = {1, 3, 5};
  cfg["dspark_noise_token_id"] = 2;
  cfg["compress_ratios"].push_back(0);
  cfg["compress_ratios"].push_back(0);
  return cfg;
}

TEST(DSpark, ConfigParsesAndSpeculationIsRefused) {
  nlohmann::json cfg = dspark_config();
  auto c = parse_config(cfg.dump(), "config.json");
  ASSERT_TRUE(c.is_ok()) << c.status().message();
  EXPECT_TRUE(c->dspark);
  EXPECT_EQ(c->num_layers, 6);
  EXPECT_EQ(c->dspark_keys.size(), 3u);
  for (auto& k : c->ignored_keys) EXPECT_NE(k.rfind("dspark_", 0), 0u) << k;
  Status st = check_mtp_config(*c);
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("DSpark draft module"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("run without --speculative"), std::string::npos);
  // The layer count must match the draft module the keys announce.
  nlohmann::json plain = read_json(model_dir("small") + "/config.json");
  plain["compress_ratios"] = cfg["compress_ratios"];
  auto bad = parse_config(plain.dump(), "config.json");
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.status().message().find("num_hidden_layers + 1"), std::string::npos);
  cfg["compress_ratios"].erase(cfg["compress_ratios"].size() - 1);
  bad = parse_config(cfg.dump(), "config.json");
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.status().message().find("DSpark"), std::string::npos) << bad.status().message();
}

// A DSpark checkpoint (small's main model, mtp.0..2 with main_proj / main_norm / markov_head)
// loads and runs as plain V4: the same logits as small's golden; the draft tensors are ignored.
TEST(DSpark, CheckpointRunsAsPlainV4) {
  const std::string src = model_dir("small");
  auto ck = std::move(Checkpoint::open(src).value());
  std::vector<TensorInfo> tensors;
  for (auto& [name, info] : ck->all())
    if (name.rfind("mtp.", 0) != 0) tensors.push_back(*info);
  Config small = load_config(src).value();
  const int64_t D = small.hidden_size;
  std::vector<float> blob(static_cast<size_t>(D * 3 * D), 0.01f);
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    TensorInfo t;
    t.name = name;
    t.dtype = DType::kF32;
    t.shape = shape;
    t.nbytes = t.numel() * 4;
    t.data = reinterpret_cast<const uint8_t*>(blob.data());
    tensors.push_back(t);
  };
  for (int b = 0; b < 3; ++b) {
    add(str("mtp.", b, ".main_proj.weight"), {D, 3 * D});
    add(str("mtp.", b, ".main_norm.weight"), {D});
    add(str("mtp.", b, ".attn.wq_a.weight"), {small.q_lora_rank, D});
  }
  add("mtp.2.markov_head.weight", {D, D});
  const std::string dir = write_model("dspark", dspark_config(), tensors);
  Config c = load_config(dir).value();
  ASSERT_TRUE(c.dspark);
  auto w = load_weights(c, dir, LoadPlan::whole(c), nullptr);
  ASSERT_TRUE(w.is_ok()) << w.status().message();
  EXPECT_EQ((*w)->stats.mtp_tensors.size(), 10u);
  auto refused = load_weights(c, dir, LoadPlan::whole(c, true), nullptr);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("DSpark"), std::string::npos);
  // Prefill logits of small's golden prompts.
  auto gfile = std::move(SafetensorsFile::open(src + "/golden.safetensors").value());
  auto prompts = read_golden(*gfile, c).value();
  auto be = make_cpu_backend(2);
  StateLimits lim{2, 512, 512, 512};
  Model model(c, **w, *be, lim);
  Engine engine(model, {2, 512, 512, c.vocab_size});
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.id = static_cast<int64_t>(i);
    r.prompt = prompts[i].ids;
    r.all_logits = true;
    r.max_new_tokens = 0;
    ASSERT_TRUE(engine.scheduler().add(r).is_ok());
  }
  const int64_t V = c.vocab_size;
  double err = 0;
  int64_t rows = 0;
  engine.run([&](int64_t req, int64_t pos, const float* l) {
    const GoldenPrompt& g = prompts[req];
    if (pos >= static_cast<int64_t>(g.ids.size())) return;
    ++rows;
    for (int64_t v = 0; v < V; ++v)
      err = std::max(err, static_cast<double>(std::fabs(l[v] - g.prefill[pos * V + v])));
  });
  EXPECT_GT(rows, 0);
  EXPECT_LE(err, 5e-5);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace sp
