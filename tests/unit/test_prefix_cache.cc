// Prefix caching: reference-counted blocks, the cache's lookup, the scheduler under random traffic
// with shared prefixes (checked against a symbolic model of every slot's and block's contents),
// and the real model on the CPU backend: a request that hits a cached prefix computes only its
// suffix and its logits are bit-identical to a run without caching, at pp 1 and pp 2 (threads).
#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/pipeline.h"
#include "engine/prefix_cache.h"
#include "engine/scheduler.h"
#include "engine/step_codec.h"
#include "model/model.h"
#include "parallel/topology.h"

namespace sp {
namespace {

TEST(BlockManagerRefs, AdoptHoldDropFreeOnlyWhenUnreferenced) {
  BlockManager m(6, 4);
  ASSERT_TRUE(m.ensure(1, 8));  // blocks for [0, 8)
  const std::vector<int32_t> prefix = m.table(1);
  m.hold(prefix);  // a cache entry
  m.adopt(2, prefix);
  ASSERT_TRUE(m.ensure(2, 12));
  EXPECT_EQ(m.table(2).size(), 3u);
  EXPECT_EQ(m.used_blocks(), 3);
  EXPECT_EQ(m.refs(prefix[0]), 3);
  EXPECT_EQ(m.check_invariants(), "");
  m.release(1);
  m.release(2);
  EXPECT_EQ(m.used_blocks(), 2);  // the entry still holds the prefix
  EXPECT_EQ(m.check_invariants(), "");
  m.drop(prefix);
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.check_invariants(), "");
}

TEST(PrefixCacheLookup, LongestBlockAlignedPrefixConfirmedByTokens) {
  PrefixCache c(4, 2, 4);
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  EXPECT_EQ(c.lookup(a, 10), nullptr);
  const int s0 = c.take_slot(), s1 = c.take_slot();
  EXPECT_EQ(c.take_slot(), -1);
  c.insert(a, 4, {7}, s0);
  c.insert(a, 8, {7, 3}, s1);
  ASSERT_NE(c.lookup(a, 10), nullptr);
  EXPECT_EQ(c.lookup(a, 10)->tokens.size(), 8u);
  EXPECT_EQ(c.lookup(a, 7)->tokens.size(), 4u);  // no longer than asked
  EXPECT_EQ(c.lookup(a, 3), nullptr);
  std::vector<int32_t> b = a;
  b[5] = 99;  // differs in the second block
  EXPECT_EQ(c.lookup(b, 10)->tokens.size(), 4u);
  EXPECT_TRUE(c.contains(a, 8));
  EXPECT_FALSE(c.contains(b, 8));
  EXPECT_EQ(c.check_invariants(), "");
  c.touch(*c.lookup(a, 7));  // the 4-token entry is now the most recent
  EXPECT_EQ(c.lru()->tokens.size(), 8u);
  c.erase(c.lru());
  EXPECT_EQ(c.free_slots(), 1);
  EXPECT_EQ(c.lookup(a, 10)->tokens.size(), 4u);
  EXPECT_EQ(c.check_invariants(), "");
}

// The CPU backend's slot copy: whole rows, contiguous and strided views; nothing else changes.
TEST(CopyRows, CpuCopiesExactlyTheRows) {
  auto be = make_cpu_backend(1);
  const int64_t R = 12, C = 5;
  Tensor t = be->alloc(R, C, DType::kF32);
  for (int64_t i = 0; i < R * C; ++i) t.f32()[i] = static_cast<float>(i);
  std::vector<float> want(t.f32(), t.f32() + R * C);
  be->copy_rows(t, 1, 7, 3);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < C; ++c) want[static_cast<size_t>((7 + r) * C + c)] = (1 + r) * C + c;
  Tensor v = t.slice_cols(1, 2);  // strided
  be->copy_rows(v, 10, 0, 2);
  for (int64_t r = 0; r < 2; ++r)
    for (int64_t c = 1; c < 3; ++c)
      want[static_cast<size_t>(r * C + c)] = want[static_cast<size_t>((10 + r) * C + c)];
  EXPECT_EQ(std::vector<float>(t.f32(), t.f32() + R * C), want);
}

// The step descriptor carries the slot copies; a copy with a negative or identical slot is refused.
TEST(StepCodec, SlotCopiesRoundTripAndBadOnesAreRefused) {
  StepPlan p;
  p.id = 3;
  p.batch.num_tokens = 1;
  p.batch.token_ids = {4};
  p.batch.positions = {256};
  p.batch.chunk_of = {0};
  SeqChunk ch;
  ch.n_tokens = 1;
  ch.start_pos = 256;
  ch.num_blocks = 2;
  p.batch.chunks = {ch};
  p.batch.block_tables = {5, 6};
  p.chunk_request = {9};
  p.copies_before = {{17, 0}};
  p.copies_after = {{0, 18}, {1, 19}};
  StepKind kind;
  auto q = decode_step(encode_step(p), &kind);
  ASSERT_TRUE(q.is_ok()) << q.status().message();
  ASSERT_EQ(q->copies_before.size(), 1u);
  EXPECT_EQ(q->copies_before[0].src, 17);
  ASSERT_EQ(q->copies_after.size(), 2u);
  EXPECT_EQ(q->copies_after[1].dst, 19);
  p.copies_after[1].dst = 1;
  EXPECT_FALSE(decode_step(encode_step(p), &kind).is_ok());
  p.copies_after[1].dst = -2;
  EXPECT_FALSE(decode_step(encode_step(p), &kind).is_ok());
}

// A symbolic model of what the stages hold: the tokens whose state each slot holds, and the
// (position, token) each block's entries were written for. Every step is applied in step order
// (as every stage does): the before-copies, each chunk (which must find its slot holding exactly
// its sequence's tokens before it and its blocks holding their tokens), the after-copies.
struct SymbolicState {
  int block_tokens;
  std::map<int, std::vector<int32_t>> slot;
  std::map<int32_t, std::map<int64_t, int32_t>> block;  // block -> position -> token
  void apply(const StepPlan& p, const std::map<int64_t, std::vector<int32_t>>& tokens) {
    for (const SlotCopy& c : p.copies_before) slot[c.dst] = slot[c.src];
    for (size_t i = 0; i < p.batch.chunks.size(); ++i) {
      const SeqChunk& ch = p.batch.chunks[i];
      const std::vector<int32_t>& t = tokens.at(p.chunk_request[i]);
      std::vector<int32_t>& st = slot[ch.slot];
      if (ch.start_pos == 0) st.clear();  // a sequence's first chunk starts from an empty state
      ASSERT_EQ(static_cast<int64_t>(st.size()), ch.start_pos)
          << "step " << p.id << " request " << p.chunk_request[i]
          << ": slot holds the wrong length";
      ASSERT_TRUE(std::equal(st.begin(), st.end(), t.begin()))
          << "step " << p.id << " request " << p.chunk_request[i] << ": slot holds other tokens";
      auto blk = [&](int64_t pos) {
        return p.batch.block_tables[static_cast<size_t>(ch.block_table + pos / block_tokens)];
      };
      for (int64_t q = 0; q < ch.start_pos; ++q) {
        auto it = block[blk(q)].find(q);
        ASSERT_TRUE(it != block[blk(q)].end() && it->second == t[static_cast<size_t>(q)])
            << "step " << p.id << " request " << p.chunk_request[i] << ": block of position " << q
            << " does not hold its token";
      }
      for (int64_t q = ch.start_pos; q < ch.start_pos + ch.n_tokens; ++q) {
        ASSERT_EQ(p.batch.token_ids[static_cast<size_t>(ch.offset + q - ch.start_pos)],
                  t[static_cast<size_t>(q)]);
        block[blk(q)][q] = t[static_cast<size_t>(q)];
        st.push_back(t[static_cast<size_t>(q)]);
      }
    }
    for (const SlotCopy& c : p.copies_after) slot[c.dst] = slot[c.src];
  }
  // A freshly allocated block holds nothing.
  void forget_free_blocks(const BlockManager& m) {
    for (auto& [b, content] : block)
      if (m.refs(b) == 0) content.clear();
  }
};

// Random arrivals sharing a few prefixes, aborts, random sampled tokens, steps in flight, a pool
// and snapshot slots far smaller than the load (preemptions and evictions happen): after every
// step every invariant holds, every chunk finds the state it needs (SymbolicState), every request
// ends once with the tokens it asked for, and at the end only cache entries hold blocks.
TEST(SchedulerPrefixCache, RandomSharedPrefixTrafficKeepsStateConsistent) {
  std::mt19937 rng(7);
  int64_t hits = 0, evictions = 0, preemptions = 0;
  for (int trial = 0; trial < 80; ++trial) {
    SchedulerLimits lim;
    lim.max_num_seqs = 1 + static_cast<int>(rng() % 5);
    lim.max_num_batched_tokens = 1 + static_cast<int>(rng() % 24);
    lim.max_model_len = 64;
    lim.vocab_size = 100;
    lim.block_tokens = 4;
    lim.num_blocks = 16 + static_cast<int>(rng() % 10);
    lim.prefix_cache_slots = 1 + static_cast<int>(rng() % 3);
    Scheduler s(lim);
    s.set_eos(99);
    SymbolicState sym{lim.block_tokens, {}, {}};
    std::vector<std::vector<int32_t>> bases;
    for (int b = 0; b < 3; ++b) {
      std::vector<int32_t> v(20 + rng() % 16);
      for (auto& t : v) t = static_cast<int32_t>(rng() % 90);
      bases.push_back(v);
    }
    std::map<int64_t, std::vector<int32_t>> tokens;  // what each request's sequence holds
    std::map<int64_t, int> want;
    std::set<int64_t> aborted, ended;
    int64_t next_id = 0;
    std::deque<StepPlan> flight;
    const int depth = 1 + static_cast<int>(rng() % 3);
    int guard = 0;
    auto arrive = [&] {
      Request r;
      r.id = next_id++;
      const auto& base = bases[rng() % bases.size()];
      r.prompt.assign(base.begin(), base.begin() + static_cast<long>(rng() % base.size() + 1));
      for (int k = static_cast<int>(rng() % 6); k > 0; --k)
        r.prompt.push_back(static_cast<int32_t>(rng() % 90));
      r.max_new_tokens = static_cast<int>(rng() % 12);
      r.sampling.ignore_eos = rng() % 2;
      r.all_logits = rng() % 10 == 0;
      const int64_t len = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
      want[r.id] = static_cast<int>(std::min<int64_t>(len, lim.max_model_len));
      tokens[r.id] = r.prompt;
      ASSERT_TRUE(s.add(r).is_ok());
    };
    for (int i = 0; i < 3; ++i) arrive();
    while (!s.idle() || !flight.empty() || next_id < 30) {
      ASSERT_LT(++guard, 40000) << "no progress";
      if (next_id < 30 && rng() % 3 == 0) arrive();
      if (rng() % 30 == 0 && next_id > 0) {
        const int64_t id = static_cast<int64_t>(rng() % next_id);
        if (!ended.count(id)) {
          s.abort(id);
          aborted.insert(id);
        }
      }
      if (static_cast<int>(flight.size()) < depth) {
        sym.forget_free_blocks(s.blocks());
        StepPlan p = s.schedule();
        ASSERT_EQ(s.check_invariants(), "") << "trial " << trial << " after schedule";
        if (!p.empty()) {
          sym.apply(p, tokens);
          if (HasFatalFailure()) return;
          flight.push_back(std::move(p));
          continue;
        }
      }
      if (flight.empty()) continue;
      StepPlan& p = flight.front();
      std::vector<Sampled> sampled;
      for (const SampleRow& r : p.samples) {
        sampled.push_back({r.request, static_cast<int32_t>(rng() % 100)});
        tokens[r.request].push_back(sampled.back().token);
      }
      s.complete(p, sampled);
      flight.pop_front();
      ASSERT_EQ(s.check_invariants(), "") << "trial " << trial << " after complete";
      for (auto& q : s.take_finished()) {
        EXPECT_TRUE(ended.insert(q->req.id).second) << "request ended twice";
        if (q->finish == FinishReason::kAbort) {
          EXPECT_TRUE(aborted.count(q->req.id));
        } else if (q->finish == FinishReason::kLength) {
          EXPECT_EQ(static_cast<int>(q->tokens.size()), want[q->req.id]) << "request " << q->req.id;
        } else {
          EXPECT_EQ(q->finish, FinishReason::kStop);
        }
        if (q->req.all_logits) {
          EXPECT_EQ(q->cached_tokens, 0);
        }
      }
    }
    EXPECT_EQ(static_cast<int64_t>(ended.size()), next_id);
    const PrefixCache& pc = *s.prefix_cache();
    int64_t held = 0;
    std::set<int32_t> cached;
    for (auto& [id, e] : pc.entries()) cached.insert(e.blocks.begin(), e.blocks.end());
    held = static_cast<int64_t>(cached.size());
    EXPECT_EQ(s.blocks().used_blocks(), held) << "blocks held by nobody but the cache leaked";
    hits += pc.stats.hits;
    evictions += pc.stats.evictions;
    preemptions += s.preemptions();
  }
  EXPECT_GT(hits, 0) << "no prefix was ever reused: the test does not test hits";
  EXPECT_GT(evictions, 0) << "nothing was ever evicted: the test does not test eviction";
  EXPECT_GT(preemptions, 0) << "the pool never ran out: the test does not test preemption";
}

// The real model (tiny fixture, CPU backend) as `pp` stages on threads, serving `waves` of
// requests one after the other (a wave arrives once the previous one has finished).
struct WaveRun {
  std::map<std::pair<int64_t, int64_t>, std::vector<float>> logits;  // (request, position)
  std::map<int64_t, std::vector<int32_t>> out;
  std::vector<int64_t> wave_tokens;  // tokens computed per wave (stage 0's steps)
  int64_t hits = 0;
};

WaveRun run_waves(int pp, int snapshot_slots, int max_seqs, int budget,
                  const std::vector<std::vector<Request>>& waves) {
  const std::string dir = std::string(SP_TEST_DATA) + "/tiny";
  Config c = load_config(dir).value();
  Topology topo{pp, 0, vllm_partition(c.num_layers, pp)};
  auto tr = make_local_transports(pp);
  WaveRun res;
  std::mutex mu;
  std::vector<std::thread> threads;
  for (int s = 0; s < pp; ++s) {
    threads.emplace_back([&, s] {
      auto w = load_weights(c, dir, LoadPlan::stage(topo.layers, s, false), nullptr);
      auto be = make_cpu_backend(1);
      StateLimits sl{max_seqs, 1024, budget, budget};
      sl.snapshot_slots = snapshot_slots;
      Model m(c, **w, *be, sl);
      Topology t = topo;
      t.rank = s;
      SchedulerLimits lim{max_seqs, budget, 1024, c.vocab_size};
      lim.prefix_cache_slots = snapshot_slots;
      Scheduler sched(with_state_blocks(lim, m));
      sched.set_eos(c.eos_token_id);
      size_t next = 0;
      StageHooks hooks;
      if (s == 0) {
        hooks.poll = [&](Scheduler& sc, bool) {
          if (next < waves.size() && sc.idle()) {
            res.wave_tokens.push_back(0);
            for (const Request& r : waves[next]) EXPECT_TRUE(sc.add(r).is_ok());
            ++next;
          }
          return next < waves.size();
        };
        hooks.on_step = [&](Scheduler& sc, const StepPlan& p, const std::vector<Sampled>&,
                            const std::vector<double>&) {
          res.wave_tokens.back() += p.batch.num_tokens;
          if (sc.prefix_cache()) res.hits = sc.prefix_cache()->stats.hits;
        };
      }
      if (s == pp - 1) {
        hooks.on_logits = [&](int64_t req, int64_t pos, const float* l) {
          std::lock_guard<std::mutex> lock(mu);
          res.logits[{req, pos}].assign(l, l + c.vocab_size);
        };
        hooks.on_sampled = [&](const Sampled& x) {
          std::lock_guard<std::mutex> lock(mu);
          res.out[x.request].push_back(x.token);
        };
      }
      std::vector<StageReport> reports;
      EXPECT_TRUE(
          run_stage(m, t, *tr[s], s == 0 ? &sched : nullptr, hooks, PipelineOptions{}, &reports)
              .is_ok());
    });
  }
  for (auto& th : threads) th.join();
  return res;
}

std::vector<int32_t> random_tokens(size_t n, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<int32_t> v(n);
  for (auto& t : v) t = static_cast<int32_t>(2 + rng() % 250);  // not BOS, not EOS
  return v;
}

Request request(int64_t id, std::vector<int32_t> prompt, int max_new) {
  Request r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.max_new_tokens = max_new;
  r.sampling.ignore_eos = true;
  return r;
}

void expect_same_logits(const WaveRun& a, const WaveRun& b) {
  ASSERT_EQ(a.logits.size(), b.logits.size());
  for (auto& [k, v] : a.logits) {
    ASSERT_TRUE(b.logits.count(k)) << "request " << k.first << " position " << k.second;
    ASSERT_EQ(0, std::memcmp(v.data(), b.logits.at(k).data(), v.size() * sizeof(float)))
        << "request " << k.first << " position " << k.second;
  }
  EXPECT_EQ(a.out, b.out);
}

class PrefixCacheModel : public ::testing::TestWithParam<int> {};

// A long shared prefix (300 tokens: one 256-token block past the sliding window and every
// compression window), then a second request with another suffix: it computes only its suffix,
// and every logit it reports has the same bits as without caching.
TEST_P(PrefixCacheModel, SecondRequestComputesOnlyItsSuffixBitIdentical) {
  const int pp = GetParam();
  const auto prefix = random_tokens(300, 1);
  auto p0 = prefix, p1 = prefix;
  for (int32_t t : random_tokens(23, 2)) p0.push_back(t);
  for (int32_t t : random_tokens(41, 3)) p1.push_back(t);
  const int gen = 5;
  std::vector<std::vector<Request>> waves = {{request(0, p0, gen)}, {request(1, p1, gen)}};
  WaveRun cached = run_waves(pp, 4, 2, 128, waves);
  WaveRun plain = run_waves(pp, 0, 2, 128, waves);
  ASSERT_EQ(cached.wave_tokens.size(), 2u);
  // Wave 1: the prompt from position 256 on, and a decode step per generated token but the last.
  EXPECT_EQ(cached.wave_tokens[1], static_cast<int64_t>(p1.size()) - 256 + gen - 1);
  EXPECT_EQ(plain.wave_tokens[1], static_cast<int64_t>(p1.size()) + gen - 1);
  EXPECT_EQ(cached.hits, 256);
  EXPECT_EQ(cached.wave_tokens[0], plain.wave_tokens[0]);
  expect_same_logits(cached, plain);
  EXPECT_EQ(cached.out.at(1).size(), static_cast<size_t>(gen));
}

// Several sequences at once sharing prefixes of different lengths (one of them exactly a block
// boundary plus one token), with a small budget (chunked prefill) and two slots: hits, misses and
// snapshot-slot eviction in one run, every logit bit-identical to the run without caching.
TEST_P(PrefixCacheModel, ConcurrentSharedPrefixesBitIdentical) {
  const int pp = GetParam();
  const auto base = random_tokens(560, 4);
  std::vector<std::vector<int32_t>> prompts;
  for (size_t len : {270, 257, 530, 300, 515}) {
    std::vector<int32_t> p(base.begin(), base.begin() + static_cast<long>(len));
    for (int32_t t : random_tokens(len % 7 + 1, len)) p.push_back(t);
    prompts.push_back(p);
  }
  std::vector<std::vector<Request>> waves(3);
  for (size_t i = 0; i < prompts.size(); ++i)
    waves[i < 2 ? 0 : i < 4 ? 1 : 2].push_back(request(static_cast<int64_t>(i), prompts[i], 3));
  WaveRun cached = run_waves(pp, 1, 2, 96, waves);
  WaveRun plain = run_waves(pp, 0, 2, 96, waves);
  EXPECT_GT(cached.hits, 0);
  int64_t c = 0, p = 0;
  for (int64_t x : cached.wave_tokens) c += x;
  for (int64_t x : plain.wave_tokens) p += x;
  EXPECT_EQ(p - c, cached.hits);
  expect_same_logits(cached, plain);
}

INSTANTIATE_TEST_SUITE_P(Stages, PrefixCacheModel, ::testing::Values(1, 2));

}  // namespace
}  // namespace sp
