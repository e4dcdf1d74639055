// The serving benchmark's shared parts (tools/bench_report.h): the random dataset, the statistics
// and the summary both bench commands print.
#include <gtest/gtest.h>

#include <random>

#include "tools/bench_report.h"

namespace sp {
namespace {

TEST(BenchReport, PercentilesInterpolateLikeNumpy) {
  const Stat s = stats({4, 1, 3, 2});
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.median, 2.5);
  EXPECT_DOUBLE_EQ(s.p90, 3.7);
  EXPECT_DOUBLE_EQ(s.p99, 3.97);
  const Stat none = stats({});
  EXPECT_EQ(none.mean, 0);
  EXPECT_EQ(none.p99, 0);
}

TEST(BenchReport, LengthRange) {
  EXPECT_EQ(length_range(100, 0).lo, 100);
  EXPECT_EQ(length_range(100, 0).hi, 100);
  EXPECT_EQ(length_range(100, 0.25).lo, 75);
  EXPECT_EQ(length_range(100, 0.25).hi, 125);
  EXPECT_EQ(length_range(1, 1).lo, 1);  // never below one token
  EXPECT_EQ(length_range(1, 1).hi, 2);
}

TEST(BenchReport, DatasetIsDrawnFromTheSeedWithinItsRanges) {
  BenchDataset d;
  d.num_prompts = 50;
  d.input_len = 40;
  d.output_len = 8;
  d.range_ratio = 0.5;
  d.vocab = 7;
  std::mt19937_64 a(3), b(3), c(4);
  const auto x = random_dataset(d, a), y = random_dataset(d, b), z = random_dataset(d, c);
  ASSERT_EQ(x.size(), 50u);
  bool differs = false;
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(x[i].ids, y[i].ids);
    EXPECT_EQ(x[i].output_len, y[i].output_len);
    differs |= x[i].ids != z[i].ids;
    EXPECT_GE(x[i].ids.size(), 20u);
    EXPECT_LE(x[i].ids.size(), 60u);
    EXPECT_GE(x[i].output_len, 4);
    EXPECT_LE(x[i].output_len, 12);
    for (int32_t t : x[i].ids) {
      EXPECT_GE(t, 0);
      EXPECT_LT(t, 7);
    }
  }
  EXPECT_TRUE(differs);
}

TEST(BenchReport, SummaryCountsOnlySuccessfulRequests) {
  std::vector<RequestOutcome> o(3);
  o[0] = {true, "", 10, 5, 0.1, 0.5, {0.1, 0.1, 0.1, 0.1}};
  o[1] = {false, "refused", 10, 0, 0, 0.01, {}};
  o[2] = {true, "", 20, 1, 0.2, 0.2, {}};
  const BenchSummary s = summarize(o, 2.0);
  EXPECT_EQ(s.num_prompts, 3);
  EXPECT_EQ(s.successful, 2);
  EXPECT_EQ(s.input_tokens, 30);
  EXPECT_EQ(s.output_tokens, 6);
  EXPECT_EQ(s.first_error, "refused");
  EXPECT_DOUBLE_EQ(s.ttft.mean, 150);  // ms
  EXPECT_DOUBLE_EQ(s.tpot.mean, 100);  // (500 - 100) / 4; one-token requests have no TPOT
  EXPECT_DOUBLE_EQ(s.itl.median, 100);
  // The JSON carries the whole summary (the offline driver sends it to the printing stage).
  const BenchSummary back = summary_from_json(bench_json("m", s));
  EXPECT_EQ(back.successful, 2);
  EXPECT_EQ(back.num_prompts, 3);
  EXPECT_EQ(back.output_tokens, 6);
  EXPECT_DOUBLE_EQ(back.tpot.mean, s.tpot.mean);
  EXPECT_DOUBLE_EQ(back.e2e.p99, s.e2e.p99);
  EXPECT_EQ(bench_json("m", s)["failed"], 1);
}

}  // namespace
}  // namespace sp
