// Speculative decoding: the acceptance rules (greedy, and rejection sampling against the target
// distribution), and the engine's rollback: drafts that are forced to be rejected at every draft
// position, across compression-window boundaries, at several pipeline splits, leave the same
// tokens, the same logits and the same caches as a run without speculation.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "engine/engine.h"
#include "engine/pipeline.h"
#include "engine/speculative.h"
#include "model/model.h"
#include "parallel/topology.h"
#include "parallel/transport.h"

namespace sp {
namespace {

// ---- acceptance rules ---------------------------------------------------------------------------

TEST(SpecAccept, GreedyKeepsTheMatchingPrefixAndTheTargetsNextToken) {
  EXPECT_EQ(accept_greedy({5, 6, 7, 8}, {5, 6, 7}), (std::vector<int32_t>{5, 6, 7, 8}));
  EXPECT_EQ(accept_greedy({5, 6, 7, 8}, {5, 9, 7}), (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(accept_greedy({5, 6, 7, 8}, {4, 6, 7}), (std::vector<int32_t>{5}));
  EXPECT_EQ(accept_greedy({5}, {}), (std::vector<int32_t>{5}));
  std::vector<int32_t> t{3, 2, 1, 0};
  cut_at_stop(t, std::vector<int32_t>{1, 9}.data(), 2);
  EXPECT_EQ(t, (std::vector<int32_t>{3, 2, 1}));
}

SamplingDist dist(const std::vector<double>& w) {
  SamplingDist d;
  for (size_t i = 0; i < w.size(); ++i)
    if (w[i] > 0) {
      d.ids.push_back(static_cast<int32_t>(i));
      d.w.push_back(w[i]);
      d.total += w[i];
    }
  return d;
}

// A deliberately wrong rule, to show the statistical test below can fail: the rejected draft is
// replaced by a draw from p itself instead of from max(0, p - q).
std::vector<int32_t> accept_wrong_residual(const std::vector<SamplingDist>& p,
                                           const std::vector<SamplingDist>& q,
                                           const std::vector<int32_t>& drafts,
                                           const SampleSpec& spec, int64_t first_pos) {
  const double u = counter_uniform(spec.seed, spec.stream ^ kAcceptStreamSalt, first_pos + 1);
  if (u * q[0].prob(drafts[0]) < p[0].prob(drafts[0])) return {drafts[0]};
  return {p[0].draw(counter_uniform(spec.seed, spec.stream ^ kResidualStreamSalt, first_pos + 1))};
}

// Chi-square statistic of the first emitted token's counts against the target distribution p0.
template <typename Rule>
double first_token_chi2(const SamplingDist& p0, const SamplingDist& p1, const SamplingDist& q0,
                        const SamplingDist& q1, int n_draft, Rule rule, int trials) {
  const int V = 6;
  std::vector<double> count(V, 0);
  SampleSpec spec;
  spec.seed = 1234;
  spec.stream = 7;
  for (int t = 0; t < trials; ++t) {
    const int64_t pos = 1000 + static_cast<int64_t>(t) * 16;  // independent draws per trial
    std::vector<int32_t> drafts;
    drafts.push_back(q0.draw(counter_uniform(spec.seed, spec.stream ^ kDraftStreamSalt, pos + 1)));
    if (n_draft > 1)
      drafts.push_back(
          q1.draw(counter_uniform(spec.seed, spec.stream ^ kDraftStreamSalt, pos + 2)));
    std::vector<SamplingDist> p{p0, p1}, q{q0, q1};
    p.resize(n_draft + 1, p1);
    auto e = rule(p, q, drafts, spec, pos);
    count[e.at(0)] += 1;
  }
  double chi2 = 0;
  for (int v = 0; v < V; ++v) {
    const double want = trials * p0.prob(v);
    if (want > 0)
      chi2 += (count[v] - want) * (count[v] - want) / want;
    else if (count[v] > 0)
      chi2 += 1e9;  // a token the target never emits
  }
  return chi2;
}

TEST(SpecAccept, RejectionSamplingEmitsTheTargetDistribution) {
  // Target and draft disagree a lot (the draft favours token 0, the target tokens 2 and 3; token 5
  // only the draft proposes, token 4 only the target).
  const SamplingDist p0 = dist({0.05, 0.10, 0.30, 0.35, 0.20, 0.0});
  const SamplingDist q0 = dist({0.40, 0.10, 0.10, 0.10, 0.0, 0.30});
  const SamplingDist p1 = dist({0.2, 0.2, 0.2, 0.2, 0.1, 0.1});
  const SamplingDist q1 = dist({0.1, 0.1, 0.1, 0.1, 0.3, 0.3});
  const int trials = 200000;
  // 5 degrees of freedom: P(chi2 > 40) is about 1e-7 for a right rule.
  for (int nd : {1, 2}) {
    const double ok = first_token_chi2(p0, p1, q0, q1, nd, accept_sampled, trials);
    EXPECT_LT(ok, 40.0) << nd << " drafts";
  }
  const double wrong = first_token_chi2(p0, p1, q0, q1, 1, accept_wrong_residual, trials);
  EXPECT_GT(wrong, 1000.0) << "the test cannot tell a wrong residual from the right one";
  // Accepting every draft emits q, not p.
  auto always = [](const std::vector<SamplingDist>&, const std::vector<SamplingDist>&,
                   const std::vector<int32_t>& d, const SampleSpec&,
                   int64_t) { return std::vector<int32_t>{d[0]}; };
  EXPECT_GT(first_token_chi2(p0, p1, q0, q1, 1, always, trials), 1000.0);
}

TEST(SpecAccept, SecondTokenFollowsTheTargetAfterAnAcceptedDraft) {
  // Given the first draft accepted, the second emitted token is distributed as the target's
  // second row (draft accepted or replaced by the residual, or the bonus token).
  const SamplingDist p0 = dist({0, 0, 1, 0, 0, 0});  // the first draft (2) is always accepted
  const SamplingDist q0 = dist({0, 0, 1, 0, 0, 0});
  const SamplingDist p1 = dist({0.05, 0.10, 0.30, 0.35, 0.20, 0.0});
  const SamplingDist q1 = dist({0.40, 0.10, 0.10, 0.10, 0.0, 0.30});
  SampleSpec spec;
  spec.seed = 99;
  std::vector<double> count(6, 0);
  const int trials = 200000;
  for (int t = 0; t < trials; ++t) {
    const int64_t pos = static_cast<int64_t>(t) * 16;
    std::vector<int32_t> drafts{
        2, q1.draw(counter_uniform(spec.seed, spec.stream ^ kDraftStreamSalt, pos + 2))};
    auto e = accept_sampled({p0, p1, p1}, {q0, q1}, drafts, spec, pos);
    ASSERT_GE(e.size(), 2u);
    ASSERT_EQ(e[0], 2);
    count[e[1]] += 1;
  }
  double chi2 = 0;
  for (int v = 0; v < 6; ++v) {
    const double want = trials * p1.prob(v);
    if (want > 0)
      chi2 += (count[v] - want) * (count[v] - want) / want;
    else
      EXPECT_EQ(count[v], 0) << "token " << v;
  }
  EXPECT_LT(chi2, 40.0);
}

// ---- rollback in the engine ---------------------------------------------------------------------

const Config& config_of(const std::string& name) {
  static std::map<std::string, Config> cache;
  auto it = cache.find(name);
  if (it == cache.end())
    it = cache.emplace(name, load_config(std::string(SP_TEST_DATA) + "/" + name).value()).first;
  return it->second;
}

// The weights stage s of `stages` loads.
const ModelWeights& stage_weights(const std::string& name, int stages, int s) {
  static std::map<std::string, std::unique_ptr<ModelWeights>> cache;
  const std::string key = name + "/" + std::to_string(stages) + "/" + std::to_string(s);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  const Config& c = config_of(name);
  auto w = load_weights(c, std::string(SP_TEST_DATA) + "/" + name,
                        LoadPlan::stage(vllm_partition(c.num_layers, stages), s, false), nullptr);
  return *cache.emplace(key, std::move(w.value())).first->second;
}

// Proposes the reference continuation, with one draft corrupted at an index that cycles from step
// to step: rejections happen at every draft index, and (no corruption) whole groups are accepted,
// at positions all around the compression windows.
class ScriptedDrafts : public DraftSource {
 public:
  ScriptedDrafts(std::map<int64_t, std::vector<int32_t>> ref, int k, int64_t vocab)
      : ref_(std::move(ref)), k_(k), vocab_(vocab) {}
  void propose(const StepPlan& plan, Tensor, const std::vector<ChunkAfterVerify>& chunks,
               std::vector<Drafted>* out, std::map<int, DraftDists>*) override {
    for (const ChunkAfterVerify& c : chunks) {
      if (!c.draft || c.rows == 0) continue;
      const int64_t req = plan.chunk_request[static_cast<size_t>(c.chunk)];
      const std::vector<int32_t>& ref = ref_.at(req);
      const int64_t last = plan.batch.chunks[static_cast<size_t>(c.chunk)].start_pos + c.rows - 1;
      Drafted d;
      d.request = req;
      const int64_t bad = calls_[req]++ % (k_ + 1);  // 0: none
      for (int j = 0; j < k_ && last + 2 + j < static_cast<int64_t>(ref.size()); ++j) {
        int32_t t = ref[static_cast<size_t>(last + 2 + j)];
        if (j + 1 == bad) t = static_cast<int32_t>((t + 1) % vocab_);
        d.tokens[d.n++] = t;
      }
      out->push_back(d);
    }
  }

 private:
  std::map<int64_t, std::vector<int32_t>> ref_;
  std::map<int64_t, int64_t> calls_;
  int k_;
  int64_t vocab_;
};

struct RunResult {
  std::map<int64_t, std::vector<int32_t>> tokens;                    // prompt + generated
  std::map<std::pair<int64_t, int64_t>, std::vector<float>> logits;  // (request, position)
  SpecCounters spec;
  // Per request: the slot and block table it ran with last (for the cache comparison).
  std::map<int64_t, std::pair<int, std::vector<int32_t>>> where;
  std::vector<std::unique_ptr<Backend>> backends;
  std::vector<std::unique_ptr<Model>> models;
};

std::vector<Request> requests(const Config& c) {
  std::vector<Request> v;
  // Three concurrent sequences of different lengths: windows (8), CSA (4) and HCA (16) boundaries
  // fall everywhere in the verify groups.
  const std::vector<std::vector<int32_t>> prompts{
      {5, 17, 33, 2, 9},
      {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21},
      {40, 41, 42}};
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.id = static_cast<int64_t>(i);
    r.prompt = prompts[i];
    for (int32_t& t : r.prompt) t %= static_cast<int32_t>(c.vocab_size);
    r.max_new_tokens = 40 + 7 * static_cast<int>(i);
    r.sampling.ignore_eos = true;
    v.push_back(r);
  }
  return v;
}

// Runs the requests at `stages` stages (threads), with `k` drafts per step from `drafter_ref`
// (0: no speculation), a small token budget (chunked prefill).
RunResult run_split(const std::string& name, int stages, int k,
                    const std::map<int64_t, std::vector<int32_t>>* drafter_ref, int budget = 8) {
  const Config& c = config_of(name);
  const int seqs = 4;
  Topology topo{stages, 0, vllm_partition(c.num_layers, stages)};
  auto tr = make_local_transports(stages);
  RunResult res;
  std::mutex mu;
  std::vector<std::thread> threads;
  res.backends.resize(stages);
  res.models.resize(stages);
  for (int s = 0; s < stages; ++s) {
    res.backends[s] = make_cpu_backend(1);
    StateLimits lim{seqs, 256, budget, budget};
    lim.spec_slack = k;
    res.models[s] =
        std::make_unique<Model>(c, stage_weights(name, stages, s), *res.backends[s], lim);
  }
  for (int s = 0; s < stages; ++s) {
    threads.emplace_back([&, s] {
      Topology t = topo;
      t.rank = s;
      SchedulerLimits sl{seqs, budget, 256, c.vocab_size};
      sl.spec_tokens = k;
      Scheduler sched(with_state_blocks(sl, *res.models[s]));
      sched.set_eos(c.eos_token_id);
      if (s == 0) {
        for (auto& r : requests(c)) EXPECT_TRUE(sched.add(r).is_ok());
      }
      std::unique_ptr<ScriptedDrafts> drafts;
      StageHooks hooks;
      if (s == stages - 1) {
        if (k > 0) drafts = std::make_unique<ScriptedDrafts>(*drafter_ref, k, c.vocab_size);
        hooks.drafter = drafts.get();
        hooks.on_logits = [&](int64_t req, int64_t pos, const float* l) {
          std::lock_guard<std::mutex> lock(mu);
          EXPECT_EQ(res.logits.count({req, pos}), 0u) << "logits of a position reported twice";
          res.logits[{req, pos}].assign(l, l + c.vocab_size);
        };
      }
      if (s == 0)
        hooks.hook = [&](const StepPlan& plan, int, Tensor) {
          std::lock_guard<std::mutex> lock(mu);
          for (size_t ci = 0; ci < plan.batch.chunks.size(); ++ci) {
            const SeqChunk& ch = plan.batch.chunks[ci];
            res.where[plan.chunk_request[ci]] = {
                ch.slot, std::vector<int32_t>(
                             plan.batch.block_tables.begin() + ch.block_table,
                             plan.batch.block_tables.begin() + ch.block_table + ch.num_blocks)};
          }
        };
      std::vector<StageReport> reports;
      EXPECT_TRUE(run_stage(*res.models[s], t, *tr[s], s == 0 ? &sched : nullptr, hooks,
                            PipelineOptions{}, &reports)
                      .is_ok());
      if (s == 0) {
        for (auto& q : sched.finished()) res.tokens[q->req.id] = q->tokens;
        res.spec = sched.spec_counters();
      }
    });
  }
  for (auto& th : threads) th.join();
  return res;
}

// The rows of a sequence's state that a next step could read, by position (rings are indexed
// modulo their size, which depends on the slack).
std::vector<float> logical_state(const RunResult& r, const Config& c, int64_t req, int slack) {
  const auto& [slot, table] = r.where.at(req);
  const int64_t len = static_cast<int64_t>(r.tokens.at(req).size()) - 1;  // positions computed
  std::vector<float> out;
  auto add = [&](const Tensor& t, int64_t row) {
    const float* p = t.row(row);
    out.insert(out.end(), p, p + t.cols);
  };
  BatchView b;
  b.block_tables = table;
  SeqChunk ch;
  ch.slot = slot;
  ch.num_blocks = static_cast<int32_t>(table.size());
  const int bt = state_block_tokens(c);
  for (const auto& m : r.models) {
    const auto& states = m->layer_states();
    for (size_t i = 0; i < states.size(); ++i) {
      const int l = m->first_layer() + static_cast<int>(i);
      const LayerState& st = states[i];
      const int W = c.sliding_window, R = window_ring_rows(c, slack);
      for (int64_t p = std::max<int64_t>(0, len - W); p < len; ++p)
        add(st.window, int64_t{slot} * R + p % R);
      const int ratio = c.compress_ratio[l];
      if (ratio == 0) continue;
      const int k = c.compressor_overlap(l), CR = compressor_ring_rows(c, l, slack);
      for (int64_t w = 0; w < len / ratio; ++w) {
        add(st.cmp, entry_row(b, ch, w, ratio, bt));
        if (st.idx.data) add(st.idx, entry_row(b, ch, w, ratio, bt));
      }
      for (int64_t p = std::max<int64_t>(0, (len / ratio - (k - 1)) * ratio); p < len; ++p) {
        add(st.cmp_buf, int64_t{slot} * CR + p % CR);
        if (st.idx_buf.data) add(st.idx_buf, int64_t{slot} * CR + p % CR);
      }
    }
  }
  return out;
}

class SpecRollback : public ::testing::TestWithParam<std::string> {};

TEST_P(SpecRollback, RejectedDraftsLeaveTokensLogitsAndCachesAsWithout) {
  const std::string name = GetParam();
  const Config& c = config_of(name);
  const RunResult ref = run_split(name, 1, 0, nullptr);
  ASSERT_EQ(ref.tokens.size(), 3u);
  // K = 8 with a budget of 16: verify chunks of 9 positions, longer than the window (8).
  for (int k : {1, 3, 8}) {
    for (int stages : {1, 2, 3}) {
      if (stages > c.num_layers) continue;
      SCOPED_TRACE("k " + std::to_string(k) + ", " + std::to_string(stages) + " stages");
      const RunResult got = run_split(name, stages, k, &ref.tokens, k == 8 ? 16 : 8);
      EXPECT_EQ(got.tokens, ref.tokens);
      EXPECT_EQ(got.logits.size(), ref.logits.size());
      EXPECT_TRUE(got.logits == ref.logits) << "logits differ";
      // Drafts were verified, some accepted and some rejected.
      EXPECT_GT(got.spec.draft_tokens, 20);
      EXPECT_GT(got.spec.accepted_tokens, 0);
      EXPECT_LT(got.spec.accepted_tokens, got.spec.draft_tokens);
      for (int64_t req = 0; req < 3; ++req)
        EXPECT_TRUE(logical_state(got, c, req, k) == logical_state(ref, c, req, 0))
            << "state of request " << req << " differs";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SpecRollback, ::testing::Values("tiny", "tinyq"));

}  // namespace
}  // namespace sp
