// The reference sampler's extensions: min-p, presence / frequency / repetition penalties and
// logprobs, and the scheduler's stop token ids.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

#include "backend/backend.h"
#include "engine/scheduler.h"

namespace sp {
namespace {

TEST(Sampling, LogprobsAreTheRawLogSoftmax) {
  const std::vector<float> l = {1.0f, 3.0f, 2.0f, 3.0f};
  SampleSpec sp;
  sp.logprobs = 3;
  TokenLogprobs lp;
  EXPECT_EQ(sample_logits_row(sp, l.data(), 4, &lp), 1);  // greedy: the first maximum
  double z = 0;
  for (float v : l) z += std::exp(v);
  EXPECT_NEAR(lp.logprob, 3.0 - std::log(z), 1e-6);
  ASSERT_EQ(lp.n_top, 3);
  EXPECT_EQ(lp.top_ids[0], 1);  // ties to the lower id
  EXPECT_EQ(lp.top_ids[1], 3);
  EXPECT_EQ(lp.top_ids[2], 2);
  EXPECT_NEAR(lp.top_logprobs[2], 2.0 - std::log(z), 1e-6);
  // Logprobs are of the raw logits, whatever the temperature or penalties.
  sp.temperature = 0.7f;
  sp.repetition_penalty = 5.0f;
  const int32_t hist[] = {1};
  sp.output_tokens = hist;
  sp.n_output = 1;
  TokenLogprobs lp2;
  sample_logits_row(sp, l.data(), 4, &lp2);
  EXPECT_FLOAT_EQ(lp2.top_logprobs[0], lp.top_logprobs[0]);
  TokenLogprobs none;
  sp.logprobs = -1;
  sample_logits_row(sp, l.data(), 4, &none);
  EXPECT_EQ(none.n_top, 0);
}

TEST(Sampling, PenaltiesMoveTheGreedyChoice) {
  const std::vector<float> l = {2.0f, 1.9f, -1.0f};
  const int32_t out[] = {0, 0};
  const int32_t prompt[] = {0};
  SampleSpec sp;
  sp.output_tokens = out;
  sp.n_output = 2;
  EXPECT_EQ(sample_logits_row(sp, l.data(), 3), 0);
  sp.presence_penalty = 0.2f;  // 2.0 - 0.2 < 1.9
  EXPECT_EQ(sample_logits_row(sp, l.data(), 3), 1);
  sp.presence_penalty = 0;
  sp.frequency_penalty = 0.06f;  // 2.0 - 2 * 0.06 < 1.9
  EXPECT_EQ(sample_logits_row(sp, l.data(), 3), 1);
  sp.frequency_penalty = 0;
  sp.n_output = 0;
  sp.prompt_tokens = prompt;
  sp.n_prompt = 1;
  sp.repetition_penalty = 1.1f;  // 2.0 / 1.1 < 1.9: the prompt counts for repetition
  EXPECT_EQ(sample_logits_row(sp, l.data(), 3), 1);
  sp.presence_penalty = 0.5f;  // presence and frequency look at generated tokens only
  sp.repetition_penalty = 1.0f;
  EXPECT_EQ(sample_logits_row(sp, l.data(), 3), 0);
}

TEST(Sampling, MinPKeepsOnlyLikelyCandidates) {
  const std::vector<float> l = {0.0f, 5.0f, 4.9f, 0.1f};
  SampleSpec sp;
  sp.temperature = 1.0f;
  std::set<int32_t> any, strict;
  for (int64_t c = 0; c < 400; ++c) {
    sp.counter = c;
    sp.min_p = 0.0f;
    any.insert(sample_logits_row(sp, l.data(), 4));
    sp.min_p = 0.5f;  // p(2) / p(1) = e^-0.1 > 0.5; the others are far below
    strict.insert(sample_logits_row(sp, l.data(), 4));
  }
  EXPECT_EQ(strict, (std::set<int32_t>{1, 2}));
  EXPECT_GT(any.size(), 2u);
  EXPECT_TRUE(SampleSpec{}.plain_greedy());
  SampleSpec lp;
  lp.logprobs = 0;
  EXPECT_FALSE(lp.plain_greedy());
}

TEST(Sampling, StopTokenIdsEndTheSequence) {
  Scheduler s({1, 16, 64, 100});
  Request r;
  r.id = 3;
  r.prompt = {5, 6};
  r.max_new_tokens = 10;
  r.stop_token_ids = {42};
  ASSERT_TRUE(s.add(r).is_ok());
  for (int32_t tok : {7, 42}) {
    StepPlan p = s.schedule();
    ASSERT_EQ(p.samples.size(), 1u);
    s.complete(p, {{3, tok}});
  }
  ASSERT_EQ(s.finished().size(), 1u);
  EXPECT_EQ(s.finished()[0]->finish, FinishReason::kStop);
  EXPECT_EQ(s.blocks().used_blocks(), 0);
}

}  // namespace
}  // namespace sp
