// Engine-level properties: batch invariance, chunked prefill and decode against full recompute,
// and scheduler invariants under random traffic.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include "engine/engine.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tools/golden.h"

namespace sp {
namespace {

struct Fixture {
  Config config;
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<SafetensorsFile> golden;
  std::vector<GoldenPrompt> prompts;
};

const Fixture& fixture(const std::string& name) {
  static std::map<std::string, Fixture> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  Fixture f;
  std::string dir = std::string(SP_TEST_DATA) + "/" + name;
  f.config = load_config(dir).value();
  f.weights = std::move(load_weights(f.config, dir, LoadPlan::whole(f.config), nullptr).value());
  f.golden = std::move(SafetensorsFile::open(dir + "/golden.safetensors").value());
  f.prompts = read_golden(*f.golden, f.config).value();
  return cache.emplace(name, std::move(f)).first->second;
}

// Logits of every position of every prompt (teacher-forced through the greedy tokens).
using AllLogits = std::map<std::pair<int64_t, int64_t>, std::vector<float>>;

AllLogits run(const Fixture& f, int threads, int max_seqs, int budget,
              std::vector<int64_t>* step_tokens = nullptr) {
  auto be = make_cpu_backend(threads, 1);  // split every op across the threads
  StateLimits lim{max_seqs, 512, budget, budget};
  Model model(f.config, *f.weights, *be, lim);
  Engine engine(model, {max_seqs, budget, 512, f.config.vocab_size});
  for (size_t i = 0; i < f.prompts.size(); ++i) {
    Request r;
    r.id = static_cast<int64_t>(i);
    r.prompt = f.prompts[i].ids;
    r.forced.assign(f.prompts[i].greedy.begin(), f.prompts[i].greedy.end() - 1);
    r.all_logits = true;
    r.max_new_tokens = 0;
    EXPECT_TRUE(engine.scheduler().add(r).is_ok());
  }
  AllLogits out;
  const int64_t V = f.config.vocab_size;
  engine.run(
      [&](int64_t req, int64_t pos, const float* l) {
        out[{req, pos}].assign(l, l + V);
      },
      [&](const StepPlan& plan, int layer, Tensor) {
        if (step_tokens && layer == f.config.num_layers - 1)
          step_tokens->push_back(plan.batch.num_tokens);
      });
  return out;
}

double max_err_vs_golden(const Fixture& f, const AllLogits& got) {
  const int64_t V = f.config.vocab_size;
  double err = 0;
  for (size_t i = 0; i < f.prompts.size(); ++i) {
    const GoldenPrompt& p = f.prompts[i];
    const int64_t L = static_cast<int64_t>(p.ids.size());
    for (int64_t pos = 0; pos < L; ++pos)
      for (int64_t v = 0; v < V; ++v)
        err = std::max(
            err, static_cast<double>(std::fabs(got.at({i, pos})[v] - p.prefill[pos * V + v])));
    for (size_t j = 0; j < p.greedy.size(); ++j)
      for (int64_t v = 0; v < V; ++v)
        err = std::max(
            err, static_cast<double>(std::fabs(got.at({i, L - 1 + j})[v] - p.decode[j * V + v])));
  }
  return err;
}

void expect_bitwise_equal(const AllLogits& a, const AllLogits& b) {
  ASSERT_EQ(a.size(), b.size());
  for (auto& [k, v] : a) {
    const auto& w = b.at(k);
    ASSERT_EQ(0, std::memcmp(v.data(), w.data(), v.size() * sizeof(float)))
        << "prompt " << k.first << " position " << k.second;
  }
}

class EngineFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineFixture, RaggedBatchEqualsOneAtATimeBitForBit) {
  const Fixture& f = fixture(GetParam());
  std::vector<int64_t> steps;
  AllLogits batched1 = run(f, 1, 8, 4096, &steps);
  // The first step really holds every prompt's whole prefill (a ragged batch in one forward).
  int64_t total = 0;
  for (auto& p : f.prompts) total += static_cast<int64_t>(p.ids.size());
  ASSERT_FALSE(steps.empty());
  EXPECT_EQ(steps[0], total);
  AllLogits batched2 = run(f, 2, 8, 4096);
  AllLogits alone1 = run(f, 1, 1, 4096);
  AllLogits alone2 = run(f, 2, 1, 4096);
  expect_bitwise_equal(batched1, alone1);
  expect_bitwise_equal(batched1, batched2);
  expect_bitwise_equal(batched1, alone2);
  EXPECT_LE(max_err_vs_golden(f, batched1), 5e-5);
}

TEST_P(EngineFixture, ChunkedPrefillAndDecodeMatchFullRecompute) {
  const Fixture& f = fixture(GetParam());
  AllLogits full = run(f, 2, 8, 4096);
  // Chunks of 1 (pure decode), 3 and 5 (ending mid compression window and mid sliding window), 37.
  for (int budget : {1, 3, 5, 37}) {
    AllLogits chunked = run(f, 2, 8, budget);
    EXPECT_LE(max_err_vs_golden(f, chunked), 5e-5) << "budget " << budget;
    expect_bitwise_equal(full, chunked);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, EngineFixture, ::testing::Values("tiny", "small", "tinyq"));

TEST(Scheduler, RandomTrafficKeepsInvariants) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    SchedulerLimits lim{1 + static_cast<int>(rng() % 4), 1 + static_cast<int>(rng() % 20), 64, 100};
    Scheduler s(lim);
    std::map<int64_t, int> want;
    const int n = 1 + static_cast<int>(rng() % 8);
    for (int i = 0; i < n; ++i) {
      Request r;
      r.id = i;
      r.prompt.resize(1 + rng() % 30, 5);
      r.max_new_tokens = static_cast<int>(rng() % 6);
      r.sampling.ignore_eos = true;
      ASSERT_TRUE(s.add(r).is_ok());
      want[i] = static_cast<int>(r.prompt.size()) + r.max_new_tokens;
    }
    std::map<int64_t, int64_t> next_pos;
    int guard = 0;
    while (!s.idle()) {
      ASSERT_LT(++guard, 10000);
      StepPlan p = s.schedule();
      ASSERT_FALSE(p.empty());
      EXPECT_LE(p.batch.num_tokens, lim.max_num_batched_tokens);
      EXPECT_LE(static_cast<int>(p.batch.chunks.size()), lim.max_num_seqs);
      std::set<int> slots;
      for (size_t c = 0; c < p.seqs.size(); ++c) {
        const SeqChunk& ch = p.batch.chunks[c];
        EXPECT_TRUE(slots.insert(ch.slot).second) << "slot used twice in a step";
        EXPECT_EQ(ch.start_pos, next_pos[p.seqs[c]->req.id]) << "positions must be contiguous";
        next_pos[p.seqs[c]->req.id] += ch.n_tokens;
      }
      std::vector<Sampled> sampled;
      for (const SampleRow& r : p.samples)
        sampled.push_back({r.request, static_cast<int32_t>(rng() % 100)});
      s.complete(p, sampled);
    }
    ASSERT_EQ(static_cast<int>(s.finished().size()), n);
    for (auto& q : s.finished()) EXPECT_EQ(static_cast<int>(q->tokens.size()), want[q->req.id]);
  }
}

// A block pool too small for the load: sequences are preempted (blocks and slot freed, prefilled
// again later from their tokens) and the greedy outputs equal the unconstrained run's.
std::map<int64_t, std::vector<int32_t>> greedy_run(const Fixture& f, int num_blocks,
                                                   int64_t* preemptions) {
  auto be = make_cpu_backend(2);
  StateLimits lim{4, 512, 64, 4};
  lim.num_blocks = num_blocks;
  Model model(f.config, *f.weights, *be, lim);
  Engine engine(model, {4, 64, 512, f.config.vocab_size});
  for (int i = 0; i < 4; ++i) {
    Request r;
    r.id = i;
    r.prompt = f.prompts[static_cast<size_t>(i) % f.prompts.size()].ids;
    r.prompt.push_back(i + 3);  // distinct sequences
    r.max_new_tokens = 300 - static_cast<int>(r.prompt.size()) + 7 * i;
    r.sampling.ignore_eos = true;
    EXPECT_TRUE(engine.scheduler().add(r).is_ok());
  }
  engine.run(nullptr);
  std::map<int64_t, std::vector<int32_t>> out;
  for (auto& s : engine.scheduler().finished()) out[s->req.id] = s->tokens;
  *preemptions = engine.scheduler().preemptions();
  EXPECT_EQ(engine.scheduler().blocks().used_blocks(), 0);
  return out;
}

TEST(EnginePaging, PreemptionByRecomputeKeepsGreedyOutputs) {
  const Fixture& f = fixture("tiny");
  ASSERT_EQ(state_block_tokens(f.config), 256);
  int64_t p_full = 0, p_small = 0;
  auto full = greedy_run(f, 0, &p_full);  // 4 slots x 2 blocks
  auto small = greedy_run(f, 5, &p_small);
  EXPECT_EQ(p_full, 0);
  EXPECT_GT(p_small, 0) << "the small pool never preempted";
  ASSERT_EQ(full.size(), 4u);
  EXPECT_EQ(full, small);
}

TEST(Scheduler, RejectsBadRequests) {
  Scheduler s({2, 8, 16, 100});
  Request r;
  r.prompt = {1, 100};
  EXPECT_NE(s.add(r).message().find("outside the vocabulary"), std::string::npos);
  r.prompt.assign(17, 1);
  EXPECT_NE(s.add(r).message().find("--max-model-len"), std::string::npos);
  r.prompt.clear();
  EXPECT_NE(s.add(r).message().find("empty"), std::string::npos);
}

}  // namespace
}  // namespace sp
