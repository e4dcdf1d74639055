// seekpipe bench serve: drives a running OpenAI-compatible server like `vllm bench serve` (random
// dataset) and reports throughput, TTFT, TPOT and ITL.
#include "tools/bench_serve.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "tools/bench_report.h"
#include "tools/driver.h"
#include "tools/flags.h"

namespace sp {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// One streamed /v1/completions request; times every SSE chunk that carries text.
RequestOutcome run_request(const std::string& host, int port, const std::string& api_key,
                           const json& body, double timeout_s) {
  RequestOutcome o;
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

}  // namespace

int cmd_bench_serve(const std::vector<std::string>& args) {
  std::vector<FlagSpec> specs = {
      {"host", FlagKind::kString, "127.0.0.1", "server address"},
      {"port", FlagKind::kInt, "8000", "server port", 1, 65535},
      {"api-key", FlagKind::kString, "", "sent as Authorization: Bearer KEY"},
      {"model", FlagKind::kString, "", "model name for the requests (default: the server's first)"},
      bench_flag("num-prompts"),
      bench_flag("random-input-len"),
      bench_flag("random-output-len"),
      bench_flag("random-range-ratio"),
      {"request-rate", FlagKind::kFloat, "0",
       "requests per second (Poisson arrivals); 0 sends all at once (vLLM's inf)", 0, 1e9},
      bench_flag("max-concurrency"),
      {"seed", FlagKind::kInt, "0", "seed of the dataset and the arrival times", 0, 9.2e18},
      {"vocab-size", FlagKind::kInt, "1000",
       "prompts are random token ids below this (keep it within the model's vocabulary)", 1,
       1 << 30},
      {"timeout", FlagKind::kFloat, "600", "seconds a single request may take", 1, 1e6},
      bench_flag("result-json"),
  };
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe bench serve [--host H] [--port P] [flags]\n%s",
                  f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (f.given("result-json"))
    if (Status st = check_result_json_path(f.str("result-json")); !st) return fail(st);
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
  std::mt19937_64 rng(static_cast<uint64_t>(f.i64("seed")));
  BenchDataset ds;
  ds.num_prompts = n;
  ds.input_len = f.i64("random-input-len");
  ds.output_len = f.i64("random-output-len");
  ds.range_ratio = f.f64("random-range-ratio");
  ds.vocab = f.i64("vocab-size");
  std::vector<json> bodies;
  for (const BenchPrompt& p : random_dataset(ds, rng))
    bodies.push_back({{"model", model},
                      {"prompt", p.ids},
                      {"max_tokens", p.output_len},
                      {"ignore_eos", true},
                      {"temperature", 0},
                      {"stream", true},
                      {"stream_options", {{"include_usage", true}}}});
  const double rate = f.f64("request-rate");
  const int max_conc = static_cast<int>(f.i64("max-concurrency"));
  std::vector<double> arrival(static_cast<size_t>(n), 0.0);
  if (rate > 0) {
    std::exponential_distribution<double> gap(rate);
    double t = 0;
    for (auto& a : arrival) a = (t += gap(rng));
  }
  std::vector<RequestOutcome> outcomes(static_cast<size_t>(n));
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
  const BenchSummary summary = summarize(outcomes, wall);
  print_bench_table(summary);
  if (Status st = emit_bench_json(bench_json(model, summary), f.str("result-json")); !st)
    return fail(st);
  return summary.successful == n ? 0 : 1;
}

}  // namespace sp
