// The serving benchmark's workload and report, shared by `bench serve` (over HTTP) and
// `bench offline` (in process): vLLM's random dataset, the per-request outcomes, their statistics
// (TTFT, TPOT, ITL, end-to-end latency) and the printed table and JSON. Needs no HTTP library.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/status.h"
#include "tools/flags.h"

namespace sp {

// A flag both bench commands take with the same meaning: num-prompts, random-input-len,
// random-output-len, random-range-ratio, max-concurrency, result-json.
FlagSpec bench_flag(const std::string& name);

// One request of the random dataset: prompt token ids and the output tokens it asks for.
struct BenchPrompt {
  std::vector<int32_t> ids;  // [input length] each in [0, vocab)
  int64_t output_len = 0;
};

struct BenchDataset {
  int num_prompts = 0;
  int64_t input_len = 0, output_len = 0;
  double range_ratio = 0;  // lengths uniform in [len * (1 - r), len * (1 + r)]
  int64_t vocab = 1;       // token ids below this
};

// The range a length is drawn from (at least 1).
struct LengthRange {
  int64_t lo = 1, hi = 1;
};
LengthRange length_range(int64_t len, double ratio);

// vLLM's random dataset: for each request an input length, an output length, then the prompt's
// ids, all drawn from `rng` in that order (bench serve then draws its arrival times from it).
std::vector<BenchPrompt> random_dataset(const BenchDataset& d, std::mt19937_64& rng);

// What one request did, as the client saw it. Times in seconds from the request's submission.
struct RequestOutcome {
  bool ok = false;
  std::string error;
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;
  double ttft = 0, e2e = 0;
  std::vector<double> itl;  // gaps between the outputs after the first
};

struct Stat {
  double mean = 0, median = 0, p90 = 0, p99 = 0;
};
// Mean and linearly interpolated percentiles (as numpy's default); all zero for no values.
Stat stats(std::vector<double> v);

// The whole run: counts, throughput and latency statistics (in ms) over the successful requests.
struct BenchSummary {
  int num_prompts = 0, successful = 0;
  double duration_s = 0;
  int64_t input_tokens = 0, output_tokens = 0;
  Stat ttft, tpot, itl, e2e;  // ms
  std::string first_error;
};
BenchSummary summarize(const std::vector<RequestOutcome>& outcomes, double duration_s);

// The table ("Serving Benchmark Result", then the latency rows and the first error if any).
void print_bench_table(const BenchSummary& s);
// The result as JSON (printed as one `json: {...}` line and written by --result-json).
nlohmann::json bench_json(const std::string& model, const BenchSummary& s);
// Inverse of bench_json (the summary travels from the driving stage to the printing one).
BenchSummary summary_from_json(const nlohmann::json& j);
// --result-json's path, checked before the run (not after it): a file or nothing there, in a
// writable directory.
Status check_result_json_path(const std::string& path);
// Each request's lengths and times (ms), as vLLM's detailed result: input_tokens, output_tokens,
// ttft_ms, e2e_ms, and error for a failed one.
nlohmann::json per_request_json(const std::vector<RequestOutcome>& outcomes);
// Prints `json: {...}` and, with a path, writes `file` there (pretty; an error names
// --result-json).
Status emit_bench_json(const nlohmann::json& result, const std::string& path);
Status emit_bench_json(const nlohmann::json& result, const nlohmann::json& file,
                       const std::string& path);

}  // namespace sp
