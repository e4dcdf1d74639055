// The GPU memory plan's suggestion: a split of the layers in which every stage fits a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "tools/driver.h"

namespace sp {
namespace {

Flags flags(std::vector<std::string> args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  Flags f(specs);
  EXPECT_TRUE(f.parse(args).is_ok());
  return f;
}

Config flash() {
  auto c = load_config(std::string(SP_TEST_DATA) + "/configs/deepseek-v4-flash");
  EXPECT_TRUE(c.is_ok()) << c.status().message();
  return std::move(c.value());
}

// The largest need of a stage of `p`.
double largest(const Flags& f, const Config& c, const std::vector<int>& p) {
  double m = 0;
  for (int s = 0; s < static_cast<int>(p.size()); ++s)
    m = std::max(m, gpu_stage_bytes(f, c, LoadPlan::stage(p, s, false), 16));
  return m;
}

TEST(GpuPlacement, SuggestedSplitFitsAndCoversEveryLayer) {
  const Config c = flash();
  const Flags f = flags({"--max-num-seqs", "16", "--max-model-len", "8192"});
  // A cap every stage of vLLM's split meets: the suggestion meets it too, stage by stage, and is
  // no worse than vLLM's split at its largest stage.
  const std::vector<int> vllm = vllm_partition(c.num_layers, 4);
  const double cap = largest(f, c, vllm);
  const std::vector<int> p = gpu_fitting_partition(f, c, 4, cap, 16);
  ASSERT_EQ(p.size(), 4u);
  EXPECT_EQ(std::accumulate(p.begin(), p.end(), 0), c.num_layers);
  for (int n : p) EXPECT_GE(n, 1);
  for (int s = 0; s < 4; ++s)
    EXPECT_LE(gpu_stage_bytes(f, c, LoadPlan::stage(p, s, false), 16), cap) << "stage " << s;
  EXPECT_LE(largest(f, c, p), cap);
}

TEST(GpuPlacement, NoSplitWhenTheLayersCannotFit) {
  const Config c = flash();
  const Flags f = flags({"--max-num-seqs", "16", "--max-model-len", "8192"});
  // What 8 stages need at most: 4 stages of that size cannot hold every layer, 8 can.
  const double cap8 = largest(f, c, vllm_partition(c.num_layers, 8));
  EXPECT_TRUE(gpu_fitting_partition(f, c, 4, cap8, 16).empty());
  const std::vector<int> p8 = gpu_fitting_partition(f, c, 8, cap8, 16);
  ASSERT_EQ(p8.size(), 8u);
  EXPECT_LE(largest(f, c, p8), cap8);
  // Less than one layer with the workspace: nothing fits at any count.
  const double one = gpu_stage_bytes(f, c, LoadPlan{1, 2, false, false}, 16);
  EXPECT_TRUE(gpu_fitting_partition(f, c, c.num_layers, one * 0.5, 16).empty());
}

}  // namespace
}  // namespace sp
