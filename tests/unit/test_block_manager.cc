// The paged block manager and the scheduler on top of it, under random traffic: arrivals,
// finishes, aborts and preemptions; every invariant is checked after every step.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "engine/block_manager.h"
#include "engine/scheduler.h"

namespace sp {
namespace {

TEST(BlockManager, GrowReleaseAndRefuse) {
  BlockManager m(5, 16);
  EXPECT_EQ(m.blocks_for_len(0), 0);
  EXPECT_EQ(m.blocks_for_len(16), 1);
  EXPECT_EQ(m.blocks_for_len(17), 2);
  ASSERT_TRUE(m.ensure(1, 17));
  ASSERT_TRUE(m.ensure(2, 40));
  EXPECT_EQ(m.used_blocks(), 5);
  EXPECT_FALSE(m.ensure(1, 33));  // no block left: nothing changes
  EXPECT_EQ(m.table(1).size(), 2u);
  EXPECT_EQ(m.check_invariants(), "");
  m.release(2);
  EXPECT_EQ(m.free_blocks(), 3);
  ASSERT_TRUE(m.ensure(1, 80));
  EXPECT_EQ(m.table(1).size(), 5u);
  m.release(1);
  m.release(1);  // twice is harmless
  EXPECT_EQ(m.free_blocks(), 5);
  EXPECT_EQ(m.check_invariants(), "");
}

TEST(BlockManager, RandomOpsNeverLeakOrShare) {
  std::mt19937 rng(11);
  BlockManager m(37, 8);
  std::map<int64_t, int64_t> len;
  for (int op = 0; op < 20000; ++op) {
    const int64_t seq = rng() % 12;
    if (rng() % 3 == 0) {
      m.release(seq);
      len.erase(seq);
    } else {
      const int64_t want = len[seq] + 1 + rng() % 20;
      const int64_t before = static_cast<int64_t>(m.table(seq).size());
      const bool fits = m.missing(seq, want) <= m.free_blocks();
      EXPECT_EQ(m.ensure(seq, want), fits);
      if (fits)
        len[seq] = want;
      else
        EXPECT_EQ(static_cast<int64_t>(m.table(seq).size()), before);
    }
    ASSERT_EQ(m.check_invariants(), "") << "op " << op;
    std::set<int32_t> seen;
    for (auto& [s, l] : len) {
      EXPECT_GE(static_cast<int64_t>(m.table(s).size()), m.blocks_for_len(l));
      for (int32_t b : m.table(s)) EXPECT_TRUE(seen.insert(b).second) << "block shared";
    }
  }
}

// Random arrivals, aborts and random sampled tokens through a pool far smaller than the load:
// preemptions happen, every invariant holds after every step, every request ends exactly once
// with the tokens it asked for (or aborted), and nothing is held at the end.
TEST(SchedulerPaging, RandomTrafficWithPreemptionKeepsInvariants) {
  std::mt19937 rng(5);
  int64_t total_preemptions = 0;
  for (int trial = 0; trial < 60; ++trial) {
    SchedulerLimits lim;
    lim.max_num_seqs = 1 + static_cast<int>(rng() % 6);
    lim.max_num_batched_tokens = 1 + static_cast<int>(rng() % 24);
    lim.max_model_len = 64;
    lim.vocab_size = 100;
    lim.block_tokens = 4;
    lim.num_blocks = 16 + static_cast<int>(rng() % 8);  // 64 positions at least: one max sequence
    Scheduler s(lim);
    s.set_eos(99);
    std::map<int64_t, int> want;  // expected final length (unless aborted)
    std::set<int64_t> aborted, ended;
    int64_t next_id = 0;
    // Steps in flight, as a pipeline keeps them (completed in order).
    std::deque<StepPlan> flight;
    const int depth = 1 + static_cast<int>(rng() % 3);
    int guard = 0;
    auto arrive = [&] {
      Request r;
      r.id = next_id++;
      r.prompt.resize(1 + rng() % 30, 5);
      r.max_new_tokens = static_cast<int>(rng() % 30);
      r.sampling.ignore_eos = rng() % 2;
      const int64_t len = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
      want[r.id] = static_cast<int>(std::min<int64_t>(len, lim.max_model_len));
      ASSERT_TRUE(s.add(r).is_ok());
    };
    for (int i = 0; i < 4; ++i) arrive();
    while (!s.idle() || !flight.empty() || next_id < 20) {
      ASSERT_LT(++guard, 20000) << "no progress";
      if (next_id < 20 && rng() % 4 == 0) arrive();
      if (rng() % 25 == 0 && next_id > 0) {
        const int64_t id = static_cast<int64_t>(rng() % next_id);
        if (!ended.count(id)) {
          s.abort(id);
          aborted.insert(id);
        }
      }
      if (static_cast<int>(flight.size()) < depth) {
        StepPlan p = s.schedule();
        ASSERT_EQ(s.check_invariants(), "") << "trial " << trial << " after schedule";
        if (!p.empty()) {
          EXPECT_LE(p.batch.num_tokens, lim.max_num_batched_tokens);
          std::set<int> slots;
          std::set<int32_t> blocks;
          for (size_t c = 0; c < p.seqs.size(); ++c) {
            const SeqChunk& ch = p.batch.chunks[c];
            EXPECT_TRUE(slots.insert(ch.slot).second) << "slot used twice in a step";
            EXPECT_EQ(ch.num_blocks, (ch.start_pos + ch.n_tokens + 3) / 4);
            for (int b = 0; b < ch.num_blocks; ++b)
              EXPECT_TRUE(blocks.insert(p.batch.block_tables[ch.block_table + b]).second)
                  << "block shared by two sequences in a step";
          }
          flight.push_back(std::move(p));
          continue;
        }
      }
      if (flight.empty()) continue;
      StepPlan& p = flight.front();
      std::vector<Sampled> sampled;
      for (const SampleRow& r : p.samples)
        sampled.push_back({r.request, static_cast<int32_t>(rng() % 100)});
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
          EXPECT_EQ(q->tokens.back(), 99);
        }
      }
    }
    for (auto& q : s.take_finished()) EXPECT_TRUE(ended.insert(q->req.id).second);
    EXPECT_EQ(static_cast<int64_t>(ended.size()), next_id);
    EXPECT_EQ(s.blocks().used_blocks(), 0);
    total_preemptions += s.preemptions();
  }
  EXPECT_GT(total_preemptions, 0) << "the pool never ran out: the test does not test preemption";
}

TEST(SchedulerPaging, RefusesWhatTheWholePoolCannotHold) {
  SchedulerLimits lim{2, 8, 64, 100, 4, 3};
  Scheduler s(lim);
  Request r;
  r.prompt.assign(13, 1);
  EXPECT_NE(s.add(r).message().find("state blocks"), std::string::npos);
  r.prompt.assign(12, 1);
  EXPECT_TRUE(s.add(r).is_ok());
}

}  // namespace
}  // namespace sp
