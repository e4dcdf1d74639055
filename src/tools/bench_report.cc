#include "tools/bench_report.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace sp {

using json = nlohmann::json;

FlagSpec bench_flag(const std::string& name) {
  static const std::vector<FlagSpec> specs = {
      {"num-prompts", FlagKind::kInt, "100", "requests to send", 1, 1 << 24},
      {"random-input-len", FlagKind::kInt, "1024", "prompt tokens (random dataset)", 1, 1 << 24},
      {"random-output-len", FlagKind::kInt, "128", "output tokens (ignore_eos)", 1, 1 << 24},
      {"random-range-ratio", FlagKind::kFloat, "0",
       "lengths uniform in [len * (1 - r), len * (1 + r)]", 0, 1},
      {"max-concurrency", FlagKind::kInt, "0", "most requests in flight; 0 = no limit", 0, 1 << 20},
      {"result-json", FlagKind::kString, "", "also write the results to this JSON file"},
  };
  for (const FlagSpec& s : specs)
    if (s.name == name) return s;
  SP_CHECK(false, "no bench flag named ", name);
  return {};
}

LengthRange length_range(int64_t len, double ratio) {
  LengthRange r;
  r.lo = std::max<int64_t>(1, static_cast<int64_t>(std::floor(len * (1 - ratio))));
  r.hi = std::max(r.lo, static_cast<int64_t>(std::ceil(len * (1 + ratio))));
  return r;
}

std::vector<BenchPrompt> random_dataset(const BenchDataset& d, std::mt19937_64& rng) {
  auto length = [&](int64_t len) {
    const LengthRange r = length_range(len, d.range_ratio);
    return std::uniform_int_distribution<int64_t>(r.lo, r.hi)(rng);
  };
  std::vector<BenchPrompt> out;
  out.reserve(static_cast<size_t>(d.num_prompts));
  for (int i = 0; i < d.num_prompts; ++i) {
    const int64_t in = length(d.input_len);
    BenchPrompt p;
    p.output_len = length(d.output_len);
    p.ids.resize(static_cast<size_t>(in));
    for (auto& t : p.ids)
      t = static_cast<int32_t>(std::uniform_int_distribution<int64_t>(0, d.vocab - 1)(rng));
    out.push_back(std::move(p));
  }
  return out;
}

Stat stats(std::vector<double> v) {
  Stat s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  auto pct = [&](double p) {
    const double idx = p * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(idx)), hi = std::min(v.size() - 1, lo + 1);
    return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
  };
  s.median = pct(0.5);
  s.p90 = pct(0.9);
  s.p99 = pct(0.99);
  return s;
}

BenchSummary summarize(const std::vector<RequestOutcome>& outcomes, double duration_s) {
  BenchSummary s;
  s.num_prompts = static_cast<int>(outcomes.size());
  s.duration_s = duration_s;
  std::vector<double> ttft, tpot, itl, e2e;
  for (const RequestOutcome& o : outcomes) {
    if (!o.ok) {
      if (s.first_error.empty()) s.first_error = o.error;
      continue;
    }
    ++s.successful;
    s.input_tokens += o.prompt_tokens;
    s.output_tokens += o.output_tokens;
    ttft.push_back(o.ttft * 1e3);
    e2e.push_back(o.e2e * 1e3);
    if (o.output_tokens > 1)
      tpot.push_back((o.e2e - o.ttft) * 1e3 / static_cast<double>(o.output_tokens - 1));
    for (double g : o.itl) itl.push_back(g * 1e3);
  }
  s.ttft = stats(ttft);
  s.tpot = stats(tpot);
  s.itl = stats(itl);
  s.e2e = stats(e2e);
  return s;
}

void print_bench_table(const BenchSummary& s) {
  const double wall = s.duration_s;
  const int ok = s.successful;
  std::printf("============ Serving Benchmark Result ============\n");
  std::printf("%-40s %12d\n", "Successful requests:", ok);
  std::printf("%-40s %12d\n", "Failed requests:", s.num_prompts - ok);
  std::printf("%-40s %12.2f\n", "Benchmark duration (s):", wall);
  std::printf("%-40s %12" PRId64 "\n", "Total input tokens:", s.input_tokens);
  std::printf("%-40s %12" PRId64 "\n", "Total generated tokens:", s.output_tokens);
  std::printf("%-40s %12.2f\n", "Request throughput (req/s):", ok / wall);
  std::printf("%-40s %12.2f\n", "Output token throughput (tok/s):", s.output_tokens / wall);
  std::printf("%-40s %12.2f\n",
              "Total token throughput (tok/s):", (s.input_tokens + s.output_tokens) / wall);
  auto row = [](const char* name, const Stat& st) {
    std::printf("%-12s mean %10.2f  median %10.2f  p90 %10.2f  p99 %10.2f  (ms)\n", name, st.mean,
                st.median, st.p90, st.p99);
  };
  row("TTFT", s.ttft);
  row("TPOT", s.tpot);
  row("ITL", s.itl);
  row("E2E latency", s.e2e);
  if (!s.first_error.empty()) std::printf("first error: %s\n", s.first_error.c_str());
}

namespace {

json stat_json(const Stat& s) {
  return json{{"mean_ms", s.mean}, {"median_ms", s.median}, {"p90_ms", s.p90}, {"p99_ms", s.p99}};
}

Stat stat_from_json(const json& j) {
  return Stat{j.at("mean_ms").get<double>(), j.at("median_ms").get<double>(),
              j.at("p90_ms").get<double>(), j.at("p99_ms").get<double>()};
}

}  // namespace

json bench_json(const std::string& model, const BenchSummary& s) {
  const double wall = s.duration_s;
  const int ok = s.successful, n = s.num_prompts;
  const int64_t in_tok = s.input_tokens, out_tok = s.output_tokens;
  return {{"model", model},
          {"num_prompts", n},
          {"successful", ok},
          {"failed", n - ok},
          {"duration_s", wall},
          {"total_input_tokens", in_tok},
          {"total_output_tokens", out_tok},
          {"request_throughput", ok / wall},
          {"output_throughput", out_tok / wall},
          {"total_token_throughput", (in_tok + out_tok) / wall},
          {"ttft", stat_json(s.ttft)},
          {"tpot", stat_json(s.tpot)},
          {"itl", stat_json(s.itl)},
          {"e2e_latency", stat_json(s.e2e)}};
}

BenchSummary summary_from_json(const json& j) {
  BenchSummary s;
  s.num_prompts = j.at("num_prompts").get<int>();
  s.successful = j.at("successful").get<int>();
  s.duration_s = j.at("duration_s").get<double>();
  s.input_tokens = j.at("total_input_tokens").get<int64_t>();
  s.output_tokens = j.at("total_output_tokens").get<int64_t>();
  s.ttft = stat_from_json(j.at("ttft"));
  s.tpot = stat_from_json(j.at("tpot"));
  s.itl = stat_from_json(j.at("itl"));
  s.e2e = stat_from_json(j.at("e2e_latency"));
  return s;
}

Status check_result_json_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p(path);
  if (path.empty() || fs::is_directory(p, ec))
    return Status::error(str("--result-json '", path, "': expected a file name"));
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    return Status::error(str("--result-json: cannot write ", path, ": directory ", dir.string(),
                             ": ", std::strerror(errno)));
  return Status::ok();
}

json per_request_json(const std::vector<RequestOutcome>& outcomes) {
  json a = json::array();
  for (const RequestOutcome& o : outcomes) {
    json r = {{"input_tokens", o.prompt_tokens},
              {"output_tokens", o.output_tokens},
              {"ttft_ms", o.ttft * 1e3},
              {"e2e_ms", o.e2e * 1e3}};
    if (!o.ok) r["error"] = o.error;
    a.push_back(std::move(r));
  }
  return a;
}

Status emit_bench_json(const json& result, const std::string& path) {
  return emit_bench_json(result, result, path);
}

Status emit_bench_json(const json& result, const json& file, const std::string& path) {
  std::printf("json: %s\n", result.dump().c_str());
  if (path.empty()) return Status::ok();
  std::ofstream out(path);
  out << file.dump(2) << "\n";
  if (!out) return Status::error(str("--result-json: cannot write ", path));
  return Status::ok();
}

}  // namespace sp
