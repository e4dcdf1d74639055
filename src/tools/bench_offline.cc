// seekpipe bench offline: bench serve's random workload and report, in process. A driver thread
// on stage 0 submits the requests into the engine loop as the HTTP server does and timestamps
// their tokens where it pops them from the requests' channel; the other stages only run.
#include "tools/bench_offline.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/engine_loop.h"
#include "tools/bench_report.h"
#include "tools/driver.h"
#include "tools/flags.h"
#include "tools/run_summary.h"

namespace sp {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs `prompts` through the loop, at most `concurrency` in flight (0: all at once), each
// greedy with EOS ignored and max_tokens its output length. One channel serves every request (the
// events name their request); a token's time is when it is popped, as a client reading a stream
// sees it. Stops early when `abandon` is set (the pipeline failed). `wall`: first submission to
// last end.
std::vector<RequestOutcome> drive(EngineLoop& loop, const std::vector<BenchPrompt>& prompts,
                                  int concurrency, uint64_t seed, const char* what,
                                  const std::atomic<bool>& abandon, double* wall) {
  const size_t n = prompts.size();
  std::vector<RequestOutcome> out(n);
  std::vector<Clock::time_point> start(n);
  std::vector<double> last(n, 0.0);
  std::unordered_map<int64_t, size_t> index;  // request id -> prompt
  auto channel = std::make_shared<RequestChannel>();
  size_t next = 0, done = 0;
  int in_flight = 0;
  auto finished = [&] {
    --in_flight;
    ++done;
    std::fprintf(stderr, "\rbench offline: %zu/%zu %s done", done, n, what);
  };
  const auto t0 = Clock::now();
  while (done < n && !abandon.load()) {
    while (next < n && (concurrency <= 0 || in_flight < concurrency)) {
      const size_t i = next++;
      Request r;
      r.id = loop.next_id();
      r.prompt = prompts[i].ids;
      r.max_new_tokens = static_cast<int>(prompts[i].output_len);
      r.sampling.temperature = 0;
      r.sampling.ignore_eos = true;
      r.sampling.seed = seed;
      out[i].prompt_tokens = static_cast<int64_t>(prompts[i].ids.size());
      index[r.id] = i;
      ++in_flight;
      start[i] = Clock::now();
      std::vector<Request> one;
      one.push_back(std::move(r));
      if (!loop.submit(std::move(one), {channel})) {
        out[i].error = "the engine loop refused the request (queue full or shutting down)";
        finished();
      }
    }
    const std::vector<EngineEvent> events = channel->pop(std::chrono::milliseconds(100));
    const auto now = Clock::now();
    for (const EngineEvent& e : events) {
      auto it = index.find(e.request);
      if (it == index.end()) continue;
      const size_t i = it->second;
      RequestOutcome& o = out[i];
      const double t = std::chrono::duration<double>(now - start[i]).count();
      switch (e.kind) {
        case EngineEvent::Kind::kToken:
          if (o.output_tokens == 0)
            o.ttft = t;
          else
            o.itl.push_back(t - last[i]);
          last[i] = t;
          ++o.output_tokens;
          break;
        case EngineEvent::Kind::kFinish:
          o.e2e = t;
          if (e.reason == FinishReason::kAbort)
            o.error = str("request ", e.request, " was aborted");
          else if (o.output_tokens == 0)
            o.error = str("request ", e.request, " ended without a token");
          else
            o.ok = true;
          index.erase(it);
          finished();
          break;
        case EngineEvent::Kind::kError:
          o.e2e = t;
          o.error = e.error;
          index.erase(it);
          finished();
          break;
      }
    }
  }
  *wall = seconds_since(t0);
  std::fprintf(stderr, "\n");
  return out;
}

std::string model_name(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (auto p = dir.rfind('/'); p != std::string::npos) dir = dir.substr(p + 1);
  return dir;
}

}  // namespace

int cmd_bench_offline(const std::vector<std::string>& args) {
  const auto started = Clock::now();
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  for (FlagSpec& s : specs)
    if (s.name == "seed")
      s.help =
          "seed of the dataset (as bench serve's --seed), of --load-format dummy weights and of "
          "sampling";
  for (const char* name : {"num-prompts", "random-input-len", "random-output-len",
                           "random-range-ratio", "max-concurrency"})
    specs.push_back(bench_flag(name));
  specs.push_back({"vocab-size", FlagKind::kInt, "",
                   "prompts are random token ids below this (default: the model's vocab_size; "
                   "at most that)",
                   1, 1 << 30});
  specs.push_back({"num-warmups", FlagKind::kInt, "0",
                   "requests of the same shape (other random ids) run and completed before the "
                   "timed ones, at the same concurrency; not counted",
                   0, 1 << 24});
  specs.push_back(bench_flag("result-json"));
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf(
          "usage: seekpipe bench offline --model DIR [--pp N] [--num-prompts N] "
          "[--random-input-len L] [--random-output-len O] [--max-concurrency C] [flags]\n"
          "bench serve's random workload and report, run in this process without HTTP: the "
          "requests go into the engine loop on stage 0 as the server's do\n%s",
          f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  // Everything checkable from the flags and config.json is checked before any weight is read.
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const int64_t vocab = f.given("vocab-size") ? f.i64("vocab-size") : cfg->vocab_size;
  if (vocab > cfg->vocab_size)
    return fail(Status::error(str("--vocab-size ", vocab, " exceeds the model's vocab_size ",
                                  cfg->vocab_size, " (", f.str("model"),
                                  "/config.json): prompt token ids must be below it; give at "
                                  "most ",
                                  cfg->vocab_size, " or leave the flag out")));
  BenchDataset ds;
  ds.num_prompts = static_cast<int>(f.i64("num-prompts"));
  ds.input_len = f.i64("random-input-len");
  ds.output_len = f.i64("random-output-len");
  ds.range_ratio = f.f64("random-range-ratio");
  ds.vocab = vocab;
  const int64_t max_in = length_range(ds.input_len, ds.range_ratio).hi;
  const int64_t max_out = length_range(ds.output_len, ds.range_ratio).hi;
  if (max_in + max_out > f.i64("max-model-len"))
    return fail(
        Status::error(str("--random-input-len ", ds.input_len, " + --random-output-len ",
                          ds.output_len, " need up to ", max_in, " + ", max_out, " = ",
                          max_in + max_out, " tokens a request (with --random-range-ratio ",
                          ds.range_ratio, "), more than --max-model-len ", f.i64("max-model-len"),
                          "; raise --max-model-len or shorten the requests")));
  if (f.given("result-json"))
    if (Status st = check_result_json_path(f.str("result-json")); !st) return fail(st);
  const uint64_t seed = static_cast<uint64_t>(f.i64("seed"));
  std::mt19937_64 rng(seed);
  const std::vector<BenchPrompt> prompts = random_dataset(ds, rng);
  // The warm-ups come from their own stream: the timed dataset is the same with or without them,
  // and they share no prefix with it (nothing for the prefix cache to find).
  BenchDataset warm = ds;
  warm.num_prompts = static_cast<int>(f.i64("num-warmups"));
  std::mt19937_64 warm_rng(seed ^ 0x9e3779b97f4a7c15ull);
  const std::vector<BenchPrompt> warmups = random_dataset(warm, warm_rng);
  const int concurrency = static_cast<int>(f.i64("max-concurrency"));
  const int64_t max_seqs = f.i64("max-num-seqs");
  const int64_t parallel =
      concurrency == 0 ? ds.num_prompts : std::min(concurrency, ds.num_prompts);
  if (parallel > max_seqs)
    std::fprintf(stderr,
                 "note: at most --max-num-seqs %" PRId64
                 " sequences run at once; the other requests wait in the engine's queue\n",
                 max_seqs);
  const std::string name = model_name(f.str("model"));

  // Every request fits the engine loop's queue: none is refused for a full queue.
  EngineLoop loop(ds.num_prompts + warm.num_prompts);
  std::atomic<bool> abandon{false};
  std::thread driver;
  double load_s = 0;
  json message;  // stage 0's results, for the last stage to print
  Job job;
  job.add_requests = [](Scheduler&) { return Status::ok(); };
  job.hooks = [&](const StageEnv& env) {
    StageHooks h;
    if (env.stage != 0) return h;
    h = loop.hooks();
    // Every stage has loaded its weights and built its model (a barrier) before this.
    load_s = seconds_since(started);
    const int slots = env.model->limits().snapshot_slots;
    std::printf(
        "bench offline: %s on %d stage%s, %d state blocks of %d tokens, %s; loaded and "
        "started in %.2f s\n",
        name.c_str(), env.topo.world, env.topo.world > 1 ? "s" : "", env.model->num_blocks(),
        env.model->block_tokens(),
        slots > 0 ? str("prefix caching with ", slots, " snapshot slots").c_str()
                  : "prefix caching off",
        load_s);
    std::printf("bench offline: %d requests (+%d warm-up), input %" PRId64 ", output %" PRId64
                ", range ratio %g, max concurrency %d\n",
                ds.num_prompts, warm.num_prompts, ds.input_len, ds.output_len, ds.range_ratio,
                concurrency);
    std::fflush(stdout);
    driver = std::thread([&] {
      double wall = 0;
      if (!warmups.empty())
        drive(loop, warmups, concurrency, seed, "warm-up requests", abandon, &wall);
      const auto outcomes = drive(loop, prompts, concurrency, seed, "requests", abandon, &wall);
      const BenchSummary s = summarize(outcomes, wall);
      message = {{"result", bench_json(name, s)},
                 {"first_error", s.first_error},
                 {"load_s", load_s},
                 {"requests", per_request_json(outcomes)}};
      loop.shutdown();
    });
    return h;
  };
  job.finish = [&](const StageEnv& env, const std::vector<StageReport>& reports) -> int {
    std::string msg;
    if (env.stage == 0) {
      if (driver.joinable()) driver.join();
      msg = message.dump();
    }
    if (env.topo.world > 1) {
      std::vector<std::string> all;
      if (Status st = env.transport->allgather(msg, &all); !st) return fail(st);
      msg = all[0];
    }
    if (!env.topo.is_last(env.stage)) return 0;
    const json m = json::parse(msg);
    json result = m.at("result");
    BenchSummary s = summary_from_json(result);
    s.first_error = m.at("first_error").get<std::string>();
    print_bench_table(s);
    print_prefix_summary(reports);
    print_pipeline_summary(reports);
    print_spec_summary(reports);
    print_graph_summary(reports);
    if (Status st = maybe_write_trace(f, reports); !st) return fail(st);
    // Beyond bench serve's keys: the run's shape, the start-up time and the stages' busy fractions
    // (busy / wall from each stage's first step to its end, warm-ups included).
    json busy = json::array();
    double busy_sum = 0;
    for (const StageReport& r : reports) {
      const double b = r.wall_s > 0 ? r.busy_s / r.wall_s : 0;
      busy.push_back(b);
      busy_sum += b;
    }
    result["max_concurrency"] = concurrency;
    result["num_warmups"] = warm.num_prompts;
    result["load_s"] = m.at("load_s");
    result["stages"] = env.topo.world;
    result["stage_busy"] = busy;
    result["bubble"] = reports.empty() ? 0.0 : 1 - busy_sum / static_cast<double>(reports.size());
    // The file also has each request's lengths and times (vLLM's detailed result); the line not.
    json file = result;
    file["requests"] = m.at("requests");
    if (Status st = emit_bench_json(result, file, f.str("result-json")); !st) return fail(st);
    return s.successful == s.num_prompts ? 0 : 1;
  };
  const int code = run_job(f, job);
  // A failed pipeline leaves the driver waiting for tokens that will not come.
  abandon = true;
  if (driver.joinable()) driver.join();
  return code;
}

}  // namespace sp
