// seekpipe bench serve: drives a running OpenAI-compatible server like `vllm bench serve` (random
// dataset) and reports throughput, TTFT, TPOT and ITL.
#include "tools/bench_serve.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "tools/driver.h"
#include "tools/flags.h"

namespace sp {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

struct Outcome {
  bool ok = false;
  std::string error;
  int prompt_tokens = 0;
  int output_tokens = 0;
  double ttft = 0, e2e = 0;
  std::vector<double> itl;  // gaps between streamed chunks after the first
};

// One streamed /v1/completions request; times every SSE chunk that carries text.
Outcome run_request(const std::string& host, int port, const std::string& api_key, const json& body,
                    double timeout_s) {
  Outcome o;
  httplib::Client cli(host, port);
  cli.set_read_timeout(static_cast<time_t>(timeout_s), 0);
  cli.set_connection_timeout(10, 0);
  httplib::Headers headers;
  if (!api_key.empty()) headers.emplace("Authorization", "Bearer " + api_key);
  const auto t0 = Clock::now();
  double last = -1;
  std::string buf;
  int status = 0;
  auto on_line = [&](const std::string& line) {
    if (line.rfind("data: ", 0) != 0) return;
    const std::string data = line.substr(6);
    if (data == "[DONE]") return;
    json j = json::parse(data, nullptr, false);
    if (j.is_discarded()) return;
    if (j.contains("usage") && j["usage"].is_object()) {
      o.prompt_tokens = j["usage"].value("prompt_tokens", 0);
      o.output_tokens = j["usage"].value("completion_tokens", 0);
    }
    if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty()) return;
    const json& c = j["choices"][0];
    if (!c.contains("text") || !c["text"].is_string() || c["text"].get<std::string>().empty())
      return;
    const double now = std::chrono::duration<double>(Clock::now() - t0).count();
    if (last < 0)
      o.ttft = now;
    else
      o.itl.push_back(now - last);
    last = now;
  };
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.headers = headers;
  req.set_header("Content-Type", "application/json");
  req.body = body.dump();
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    buf.append(data, n);
    size_t pos;
    while ((pos = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, pos);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      buf.erase(0, pos + 1);
      if (!line.empty()) on_line(line);
    }
    return true;
  };
  httplib::Response resp;
  httplib::Error err = httplib::Error::Success;
  const bool sent = cli.send(req, resp, err);
  o.e2e = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!sent) {
    o.error = "connection failed: " + httplib::to_string(err);
    return o;
  }
  status = resp.status;
  if (status != 200) {
    o.error = str("HTTP ", status, ": ", buf.substr(0, 200));
    return o;
  }
  o.ok = last >= 0;
  if (!o.ok) o.error = "no tokens streamed";
  return o;
}

struct Stat {
  double mean = 0, median = 0, p90 = 0, p99 = 0;
};

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

}  // namespace

int cmd_bench_serve(const std::vector<std::string>& args) {
  std::vector<FlagSpec> specs = {
      {"host", FlagKind::kString, "127.0.0.1", "server address"},
      {"port", FlagKind::kInt, "8000", "server port", 1, 65535},
      {"api-key", FlagKind::kString, "", "sent as Authorization: Bearer KEY"},
      {"model", FlagKind::kString, "", "model name for the requests (default: the server's first)"},
      {"num-prompts", FlagKind::kInt, "100", "requests to send", 1, 1 << 24},
      {"random-input-len", FlagKind::kInt, "1024", "prompt tokens (random dataset)", 1, 1 << 24},
      {"random-output-len", FlagKind::kInt, "128", "output tokens (ignore_eos)", 1, 1 << 24},
      {"random-range-ratio", FlagKind::kFloat, "0",
       "lengths uniform in [len * (1 - r), len * (1 + r)]", 0, 1},
      {"request-rate", FlagKind::kFloat, "0",
       "requests per second (Poisson arrivals); 0 sends all at once (vLLM's inf)", 0, 1e9},
      {"max-concurrency", FlagKind::kInt, "0", "most requests in flight; 0 = no limit", 0, 1 << 20},
      {"seed", FlagKind::kInt, "0", "seed of the dataset and the arrival times", 0, 9.2e18},
      {"vocab-size", FlagKind::kInt, "1000",
       "prompts are random token ids below this (keep it within the model's vocabulary)", 1,
       1 << 30},
      {"timeout", FlagKind::kFloat, "600", "seconds a single request may take", 1, 1e6},
      {"result-json", FlagKind::kString, "", "also write the results to this JSON file"},
  };
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe bench serve [--host H] [--port P] [flags]\n%s",
                  f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  const std::string host = f.str("host");
  const int port = static_cast<int>(f.i64("port"));
  std::string model = f.str("model");
  {
    httplib::Client cli(host, port);
    cli.set_connection_timeout(10, 0);
    httplib::Headers h;
    if (!f.str("api-key").empty()) h.emplace("Authorization", "Bearer " + f.str("api-key"));
    auto res = cli.Get("/v1/models", h);
    if (!res)
      return fail(Status::error(str("cannot reach the server at ", host, ":", port, " (",
                                    httplib::to_string(res.error()), ")")));
    if (res->status != 200)
      return fail(Status::error(str("GET /v1/models answered HTTP ", res->status)));
    json j = json::parse(res->body, nullptr, false);
    if (model.empty()) {
      if (j.is_discarded() || !j.contains("data") || !j["data"].is_array() || j["data"].empty())
        return fail(Status::error("GET /v1/models returned no model"));
      model = j["data"][0].value("id", "");
    }
  }
  const int n = static_cast<int>(f.i64("num-prompts"));
  const int64_t vocab = f.i64("vocab-size");
  std::mt19937_64 rng(static_cast<uint64_t>(f.i64("seed")));
  const double ratio = f.f64("random-range-ratio");
  auto length = [&](int64_t len) {
    const int64_t lo = std::max<int64_t>(1, static_cast<int64_t>(std::floor(len * (1 - ratio))));
    const int64_t hi = std::max(lo, static_cast<int64_t>(std::ceil(len * (1 + ratio))));
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  std::vector<json> bodies;
  for (int i = 0; i < n; ++i) {
    const int64_t in = length(f.i64("random-input-len")), out = length(f.i64("random-output-len"));
    std::vector<int64_t> ids(static_cast<size_t>(in));
    for (auto& t : ids) t = std::uniform_int_distribution<int64_t>(0, vocab - 1)(rng);
    bodies.push_back({{"model", model},
                      {"prompt", ids},
                      {"max_tokens", out},
                      {"ignore_eos", true},
                      {"temperature", 0},
                      {"stream", true},
                      {"stream_options", {{"include_usage", true}}}});
  }
  const double rate = f.f64("request-rate");
  const int max_conc = static_cast<int>(f.i64("max-concurrency"));
  std::vector<double> arrival(static_cast<size_t>(n), 0.0);
  if (rate > 0) {
    std::exponential_distribution<double> gap(rate);
    double t = 0;
    for (auto& a : arrival) a = (t += gap(rng));
  }
  std::vector<Outcome> outcomes(static_cast<size_t>(n));
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0;
  std::atomic<int> done{0};
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::this_thread::sleep_until(t0 + std::chrono::duration<double>(arrival[i]));
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return max_conc <= 0 || in_flight < max_conc; });
      ++in_flight;
    }
    threads.emplace_back([&, i] {
      outcomes[i] = run_request(host, port, f.str("api-key"), bodies[i], f.f64("timeout"));
      {
        std::lock_guard<std::mutex> lk(mu);
        --in_flight;
      }
      cv.notify_all();
      const int d = ++done;
      std::fprintf(stderr, "\rbench serve: %d/%d requests done", d, n);
    });
  }
  for (auto& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  std::fprintf(stderr, "\n");
  int ok = 0;
  int64_t in_tok = 0, out_tok = 0;
  std::vector<double> ttft, tpot, itl, e2e;
  std::string first_error;
  for (const Outcome& o : outcomes) {
    if (!o.ok) {
      if (first_error.empty()) first_error = o.error;
      continue;
    }
    ++ok;
    in_tok += o.prompt_tokens;
    out_tok += o.output_tokens;
    ttft.push_back(o.ttft * 1e3);
    e2e.push_back(o.e2e * 1e3);
    if (o.output_tokens > 1) tpot.push_back((o.e2e - o.ttft) * 1e3 / (o.output_tokens - 1));
    for (double g : o.itl) itl.push_back(g * 1e3);
  }
  const Stat st_ttft = stats(ttft), st_tpot = stats(tpot), st_itl = stats(itl), st_e2e = stats(e2e);
  std::printf("============ Serving Benchmark Result ============\n");
  std::printf("%-40s %12d\n", "Successful requests:", ok);
  std::printf("%-40s %12d\n", "Failed requests:", n - ok);
  std::printf("%-40s %12.2f\n", "Benchmark duration (s):", wall);
  std::printf("%-40s %12" PRId64 "\n", "Total input tokens:", in_tok);
  std::printf("%-40s %12" PRId64 "\n", "Total generated tokens:", out_tok);
  std::printf("%-40s %12.2f\n", "Request throughput (req/s):", ok / wall);
  std::printf("%-40s %12.2f\n", "Output token throughput (tok/s):", out_tok / wall);
  std::printf("%-40s %12.2f\n", "Total token throughput (tok/s):", (in_tok + out_tok) / wall);
  auto row = [](const char* name, const Stat& s) {
    std::printf("%-12s mean %10.2f  median %10.2f  p90 %10.2f  p99 %10.2f  (ms)\n", name, s.mean,
                s.median, s.p90, s.p99);
  };
  row("TTFT", st_ttft);
  row("TPOT", st_tpot);
  row("ITL", st_itl);
  row("E2E latency", st_e2e);
  if (!first_error.empty()) std::printf("first error: %s\n", first_error.c_str());
  auto sj = [](const Stat& s) {
    return json{{"mean_ms", s.mean}, {"median_ms", s.median}, {"p90_ms", s.p90}, {"p99_ms", s.p99}};
  };
  json result = {{"model", model},
                 {"num_prompts", n},
                 {"successful", ok},
                 {"failed", n - ok},
                 {"duration_s", wall},
                 {"total_input_tokens", in_tok},
                 {"total_output_tokens", out_tok},
                 {"request_throughput", ok / wall},
                 {"output_throughput", out_tok / wall},
                 {"total_token_throughput", (in_tok + out_tok) / wall},
                 {"ttft", sj(st_ttft)},
                 {"tpot", sj(st_tpot)},
                 {"itl", sj(st_itl)},
                 {"e2e_latency", sj(st_e2e)}};
  std::printf("json: %s\n", result.dump().c_str());
  if (f.given("result-json")) {
    std::ofstream out(f.str("result-json"));
    out << result.dump(2) << "\n";
    if (!out) return fail(Status::error(str("--result-json: cannot write ", f.str("result-json"))));
  }
  return ok == n ? 0 : 1;
}

}  // namespace sp
