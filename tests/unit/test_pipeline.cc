// Topology, stage loading and the step descriptor.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>

#include "engine/pipeline.h"
#include "engine/step_codec.h"
#include "model/model.h"
#include "parallel/topology.h"

namespace sp {
namespace {

Config flash() {
  return load_config(std::string(SP_TEST_DATA) + "/configs/deepseek-v4-flash").value();
}

TEST(Topology, DefaultSplitIsVllms) {
  EXPECT_EQ(vllm_partition(43, 4), (std::vector<int>{11, 11, 11, 10}));
  EXPECT_EQ(vllm_partition(6, 4), (std::vector<int>{1, 2, 2, 1}));
  EXPECT_EQ(vllm_partition(61, 8), (std::vector<int>{7, 7, 8, 8, 8, 8, 8, 7}));
  EXPECT_EQ(vllm_partition(5, 5), (std::vector<int>{1, 1, 1, 1, 1}));
  EXPECT_EQ(vllm_partition(5, 1), (std::vector<int>{5}));
  Config c = flash();
  auto t = make_topology(c, 4, 2, "", {});
  ASSERT_TRUE(t.is_ok());
  EXPECT_EQ(t->first_layer(2), 22);
  EXPECT_EQ(t->end_layer(2), 33);
  EXPECT_EQ(t->partition_string(), "11,11,11,10");
}

TEST(Topology, ExplicitPartitionIsValidated) {
  EXPECT_EQ(parse_partition("11,11,11,10", 43, 4).value(), (std::vector<int>{11, 11, 11, 10}));
  EXPECT_NE(parse_partition("11,11,11,11", 43, 4).status().message().find("covers 44 layers"),
            std::string::npos);
  EXPECT_NE(parse_partition("22,21", 43, 4).status().message().find("expected --pp = 4"),
            std::string::npos);
  EXPECT_NE(parse_partition("43,0", 43, 2).status().message().find("'0'"), std::string::npos);
  EXPECT_NE(parse_partition("a,b", 43, 2).status().message().find("'a'"), std::string::npos);
  Config c = flash();
  EXPECT_NE(make_topology(c, 44, 0, "", {}).status().message().find("more stages than"),
            std::string::npos);
}

TEST(Topology, AutoPartitionBalancesTheCostModel) {
  Config c = flash();
  CostModelOptions o{16, 4096, false};
  for (int pp : {2, 3, 4, 8}) {
    auto p = auto_partition(c, pp, o);
    ASSERT_EQ(static_cast<int>(p.size()), pp);
    int sum = 0;
    for (int v : p) {
      EXPECT_GE(v, 1);
      sum += v;
    }
    EXPECT_EQ(sum, 43);
    // No worse than vLLM's split on the largest stage share of predicted time.
    auto share = [&](const std::vector<int>& part) {
      auto costs = stage_costs(c, part, o);
      double total = 0, worst = 0;
      for (auto& s : costs) total += s.time;
      for (auto& s : costs) worst = std::max(worst, s.time / total);
      return worst;
    };
    EXPECT_LE(share(p), share(vllm_partition(43, pp)) + 1e-9) << pp;
  }
  // At batch 1 the head reads about four layers' worth of bytes per step for Flash, so the cost
  // model gives the last stage fewer layers than vLLM's 10.
  auto p4 = auto_partition(c, 4, CostModelOptions{1, 8192, false});
  EXPECT_LT(p4[3], 10);
}

// The head's cost fitted from stage times made with a known factor comes back; with it, auto
// gives the last stage more layers as the head gets cheaper.
TEST(Topology, FitHeadCostRecoversTheFactor) {
  Config c = flash();
  const CostModelOptions bytes{1, 8192, false};
  const std::vector<int> part = vllm_partition(43, 4);
  for (double k : {0.25, 1.0, 2.0}) {
    CostModelOptions o = bytes;
    o.head_cost = k;
    std::vector<double> ms;
    for (const StageCost& s : stage_costs(c, part, o)) ms.push_back(s.time * 3e-9);  // any a
    auto fit = fit_head_cost(c, part, ms, bytes);
    ASSERT_TRUE(fit.is_ok()) << fit.status().message();
    EXPECT_NEAR(*fit, k, 1e-9 * k);
  }
  CostModelOptions cheap = bytes;
  cheap.head_cost = 0.25;
  EXPECT_GE(auto_partition(c, 4, cheap)[3], auto_partition(c, 4, bytes)[3]);
  // What cannot be fitted is an error.
  EXPECT_FALSE(fit_head_cost(c, part, {1, 1, 1}, bytes).is_ok());      // a time per stage
  EXPECT_FALSE(fit_head_cost(c, {43}, {1}, bytes).is_ok());            // 2 stages at least
  EXPECT_FALSE(fit_head_cost(c, part, {1, 1, -1, 1}, bytes).is_ok());  // positive times
  EXPECT_FALSE(fit_head_cost(c, part, {9, 9, 9, 5}, bytes).is_ok());   // head no cost
}

TEST(Topology, LayerKindsCostDifferently) {
  Config c = flash();
  CostModelOptions o{1, 65536, false};
  // CSA (indexer) > HCA > sliding-only at long context.
  EXPECT_GT(layer_time_cost(c, 2, o), layer_time_cost(c, 3, o));
  EXPECT_GT(layer_time_cost(c, 3, o), layer_time_cost(c, 0, o));
}

TEST(StageLoading, EachStageReadsOnlyItsOwnTensors) {
  const std::string dir = std::string(SP_TEST_DATA) + "/small";
  Config c = load_config(dir).value();
  auto ck = std::move(Checkpoint::open(dir).value());
  for (int pp : {2, 3, 6}) {
    Topology t{pp, 0, vllm_partition(c.num_layers, pp)};
    std::set<std::string> seen;
    int64_t total_bytes = 0;
    for (int s = 0; s < pp; ++s) {
      LoadPlan plan{t.first_layer(s), t.end_layer(s), s == 0, s == pp - 1};
      auto w = load_weights(c, dir, plan, nullptr);
      ASSERT_TRUE(w.is_ok()) << w.status().message();
      const LoadStats& st = (*w)->stats;
      int64_t bytes = 0;
      for (const std::string& name : st.accessed) {
        // Every tensor read belongs to this stage: its layers, or the embedding / head it owns.
        bool own = false;
        if (name.rfind("layers.", 0) == 0) {
          int layer = std::stoi(name.substr(7));
          own = layer >= plan.first_layer && layer < plan.end_layer;
        } else if (name == "embed.weight") {
          own = plan.embed;
        } else {
          own = plan.head;
        }
        EXPECT_TRUE(own) << "stage " << s << " read " << name;
        EXPECT_TRUE(seen.insert(name).second) << name << " read by two stages";
        bytes += ck->find(name)->nbytes;
      }
      EXPECT_EQ(st.bytes, bytes);  // holds exactly what it read
      EXPECT_EQ(static_cast<int>((*w)->layers.size()), plan.end_layer - plan.first_layer);
      EXPECT_EQ((*w)->embed.valid(), plan.embed);
      EXPECT_EQ((*w)->head.valid(), plan.head);
      total_bytes += bytes;
      // Sequence state only for its own layers.
      auto be = make_cpu_backend(1);
      Model m(c, **w, *be, StateLimits{2, 256, 16, 2});
      int64_t want = 0;
      for (int l = plan.first_layer; l < plan.end_layer; ++l) {
        const int64_t dh = c.head_dim, r = c.compress_ratio[l];
        want += 2 * c.sliding_window * dh * 4;
        if (r > 0) {
          // Entries live in whole state blocks: the slot's blocks cover max_model_len.
          const int64_t bt = state_block_tokens(c);
          const int64_t k = c.compressor_overlap(l), entries = blocks_for(256, bt) * bt / r;
          // The compressor's input ring: k * r positions of values and gates (k * dh each).
          want += 2 * (entries * dh + k * r * 2 * k * dh) * 4;
          if (c.attn_kinds[l] == AttnKind::kCSA)
            want += 2 * (entries * c.index_head_dim + 2 * r * 2 * 2 * c.index_head_dim) * 4;
        }
      }
      EXPECT_EQ(m.state_bytes(), want) << "stage " << s;
    }
    // Together the stages read every main-model tensor exactly once.
    size_t main = 0;
    for (auto& [name, info] : ck->all()) main += name.rfind("mtp.", 0) != 0;
    EXPECT_EQ(seen.size(), main);
  }
}

TEST(StageLoading, MtpRoomOnTheLastStageOnly) {
  const std::string dir = std::string(SP_TEST_DATA) + "/tiny";
  Config c = load_config(dir).value();
  std::vector<int> part = vllm_partition(c.num_layers, 2);
  EXPECT_FALSE(LoadPlan::stage(part, 1, false).embed);
  EXPECT_TRUE(LoadPlan::stage(part, 1, true).embed);  // the draft layer embeds the next tokens
  EXPECT_TRUE(LoadPlan::stage(part, 0, true).embed);
  for (bool mtp : {false, true}) {
    for (int s = 0; s < 2; ++s) {
      auto w = load_weights(c, dir, LoadPlan::stage(part, s, mtp), nullptr);
      ASSERT_TRUE(w.is_ok());
      auto be = make_cpu_backend(1);
      StateLimits lim{2, 64, 16, 2};
      lim.mtp = mtp;
      Model m(c, **w, *be, lim);
      const bool want = mtp && s == 1;
      EXPECT_EQ(m.mtp_hidden().data != nullptr, want) << "stage " << s << " mtp " << mtp;
      if (want) {
        EXPECT_EQ(m.mtp_hidden().rows, 16);
        EXPECT_EQ(m.mtp_hidden().cols, c.hc_dim());
      }
    }
  }
}

// Runs tiny as a 2-stage threads pipeline and returns stage 0's step sizes in scheduling order.
// Stage 1 holds its first step until stage 0 has scheduled `hold_until` steps, so the result does
// not depend on how the threads happen to be scheduled (on a loaded machine stage 0 can otherwise
// be preempted long enough for step 0's tokens to come back before it schedules step 1).
std::vector<int> pipeline_step_tokens(const std::vector<Request>& reqs, int budget,
                                      int micro_batches, size_t hold_until) {
  const std::string dir = std::string(SP_TEST_DATA) + "/tiny";
  Config c = load_config(dir).value();
  Topology topo{2, 0, vllm_partition(c.num_layers, 2)};
  auto tr = make_local_transports(2);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> tokens;
  std::vector<std::thread> threads;
  for (int s = 0; s < 2; ++s) {
    threads.emplace_back([&, s] {
      auto w = load_weights(c, dir, LoadPlan::stage(topo.layers, s, false), nullptr);
      auto be = make_cpu_backend(1);
      Model m(c, **w, *be, StateLimits{16, 256, budget, budget});
      Topology t = topo;
      t.rank = s;
      Scheduler sched(SchedulerLimits{16, budget, 256, c.vocab_size});
      for (auto& r : reqs) EXPECT_TRUE(sched.add(r).is_ok());
      StageHooks hooks;
      int64_t last_step = -1;
      bool held = false;
      if (s == 0)
        hooks.hook = [&](const StepPlan& plan, int layer, Tensor) {
          if (layer == t.first_layer(0) && plan.id != last_step) {
            std::lock_guard<std::mutex> lock(mu);
            tokens.push_back(plan.batch.num_tokens);
            last_step = plan.id;
            cv.notify_all();
          }
        };
      else
        hooks.hook = [&](const StepPlan&, int, Tensor) {
          if (held) return;
          held = true;
          std::unique_lock<std::mutex> lock(mu);
          // The deadline only guards against a hang if stage 0 never schedules that many steps.
          EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(60),
                                  [&] { return tokens.size() >= hold_until; }));
        };
      PipelineOptions opt;
      opt.micro_batches = micro_batches;
      std::vector<StageReport> reports;
      EXPECT_TRUE(run_stage(m, t, *tr[s], s == 0 ? &sched : nullptr, hooks, opt, &reports).is_ok());
    });
  }
  for (auto& th : threads) th.join();
  return tokens;
}

TEST(Pipeline, BurstIsSpreadOverMicroBatchesByTokenLoad) {
  std::vector<Request> reqs;
  for (int i = 0; i < 8; ++i) {
    Request r;
    r.id = i;
    r.prompt.assign(20, 3 + i);
    r.max_new_tokens = 2;
    r.sampling.ignore_eos = true;
    reqs.push_back(r);
  }
  // 160 prompt tokens, a budget that would take them all in one step, two micro-batches: the burst
  // is split 80 / 80 instead of 160 / 0.
  auto steps = pipeline_step_tokens(reqs, 512, 2, 2);
  ASSERT_GE(steps.size(), 2u);
  EXPECT_EQ(steps[0], 80);
  EXPECT_EQ(steps[1], 80);
}

TEST(Scheduler, LongPrefillChunksFollowEachOtherWithoutWaiting) {
  Scheduler s(SchedulerLimits{4, 16, 256, 100});
  Request r;
  r.id = 1;
  r.prompt.assign(50, 7);
  r.max_new_tokens = 1;
  ASSERT_TRUE(s.add(r).is_ok());
  // Nothing has completed, yet each step takes the next chunk of the same prompt.
  for (int k = 0; k < 3; ++k) {
    StepPlan p = s.schedule();
    ASSERT_EQ(p.batch.chunks.size(), 1u);
    EXPECT_EQ(p.batch.chunks[0].start_pos, 16 * k);
    EXPECT_EQ(p.batch.chunks[0].n_tokens, 16);
    EXPECT_TRUE(p.samples.empty());
  }
  StepPlan last = s.schedule();
  EXPECT_EQ(last.batch.chunks[0].n_tokens, 2);
  ASSERT_EQ(last.samples.size(), 1u);  // the prompt's last chunk samples the first new token
  // A decode cannot start before that token is back.
  EXPECT_TRUE(s.schedule().empty());
}

TEST(StepCodec, RoundTrip) {
  StepPlan p;
  p.id = 42;
  p.batch.num_tokens = 3;
  p.batch.token_ids = {5, 6, 7};
  p.batch.positions = {0, 1, 9};
  p.batch.chunk_of = {0, 0, 1};
  SeqChunk a, b;
  a.n_tokens = 2;
  a.num_blocks = 1;
  b.slot = 3;
  b.start_pos = 9;
  b.n_tokens = 1;
  b.offset = 2;
  b.block_table = 1;
  b.num_blocks = 1;
  p.batch.chunks = {a, b};
  p.batch.block_tables = {0, 3};
  p.chunk_request = {10, 11};
  p.batch.logit_rows = {1, 2};
  p.logit_request = {10, 11};
  p.logit_position = {1, 9};
  p.samples = {SampleRow{1, 11, SamplingParams{0.7f, 5, 0.9f, 3, true}}};
  StepKind kind;
  auto q = decode_step(encode_step(p), &kind);
  ASSERT_TRUE(q.is_ok());
  EXPECT_EQ(kind, StepKind::kStep);
  EXPECT_EQ(q->id, 42);
  EXPECT_EQ(q->batch.positions, p.batch.positions);
  EXPECT_EQ(q->batch.chunks[1].slot, 3);
  EXPECT_EQ(q->batch.chunks[1].start_pos, 9);
  EXPECT_EQ(q->batch.block_tables, p.batch.block_tables);
  EXPECT_EQ(q->batch.logit_rows, p.batch.logit_rows);
  EXPECT_EQ(q->samples[0].params.top_k, 5);
  EXPECT_TRUE(q->samples[0].params.ignore_eos);
  auto bytes = encode_step(p);
  bytes.pop_back();
  EXPECT_FALSE(decode_step(bytes, &kind).is_ok());
  decode_step(encode_stop(), &kind);
  EXPECT_EQ(kind, StepKind::kStop);
  int64_t step;
  auto s = decode_sampled(encode_sampled(7, {{1, 2}, {3, 4}}), &step);
  ASSERT_TRUE(s.is_ok());
  EXPECT_EQ(step, 7);
  EXPECT_EQ(s->at(1).token, 4);
}

// Speculative decoding's fields: a verify group's draft rows and stop tokens, the token after each
// chunk, the drafts coming back with the sampled tokens; indices outside the step are refused.
TEST(StepCodec, SpeculativeFieldsRoundTripAndAreChecked) {
  StepPlan p;
  p.batch.num_tokens = 3;
  p.batch.token_ids = {5, 6, 7};
  p.batch.positions = {4, 5, 6};
  p.batch.chunk_of = {0, 0, 0};
  SeqChunk a;
  a.n_tokens = 3;
  a.start_pos = 4;
  a.num_blocks = 1;
  p.batch.chunks = {a};
  p.batch.block_tables = {0};
  p.chunk_request = {10};
  p.batch.logit_rows = {0, 1, 2};
  p.logit_request = {10, 10, 10};
  p.logit_position = {4, 5, 6};
  SampleRow r{0, 10, SamplingParams{}};
  r.n_draft = 2;
  r.n_stop = 2;
  r.draft = 1;
  p.samples = {r};
  p.stop_tokens = {1, 9};
  p.chunk_next = {-1};
  StepKind kind;
  auto q = decode_step(encode_step(p), &kind);
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  EXPECT_EQ(q->samples[0].n_draft, 2);
  EXPECT_EQ(q->stop_tokens, p.stop_tokens);
  EXPECT_EQ(q->chunk_next, p.chunk_next);
  StepPlan bad = p;
  bad.samples[0].n_draft = 3;  // past the logit rows
  EXPECT_FALSE(decode_step(encode_step(bad), &kind).is_ok());
  bad = p;
  bad.samples[0].n_stop = 3;  // past the stop tokens
  EXPECT_FALSE(decode_step(encode_step(bad), &kind).is_ok());
  bad = p;
  bad.chunk_next = {-1, 4};  // one per chunk
  EXPECT_FALSE(decode_step(encode_step(bad), &kind).is_ok());
  Drafted d;
  d.request = 10;
  d.n = 2;
  d.tokens[0] = 3;
  d.tokens[1] = 4;
  int64_t step = 0;
  std::vector<Drafted> got;
  auto s = decode_sampled(encode_sampled(5, {{10, 6}}, {}, {d}), &step, nullptr, &got);
  ASSERT_TRUE(s.is_ok());
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].n, 2);
  EXPECT_EQ(got[0].tokens[1], 4);
  d.n = kMaxSpecTokens + 1;
  EXPECT_FALSE(decode_sampled(encode_sampled(5, {{10, 6}}, {}, {d}), &step, nullptr, &got).is_ok());
}

}  // namespace
}  // namespace sp
