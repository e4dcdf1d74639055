// seekpipe serve: the OpenAI-compatible HTTP server on stage 0 of any pipeline (threads or
// mpirun); the engine loop runs inside stage 0's StageRunner.
#include "tools/serve.h"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "engine/engine_loop.h"
#include "server/server.h"
#include "tools/driver.h"
#include "tools/text_commands.h"

namespace sp {

namespace {

// Set by SIGINT / SIGTERM; a watcher thread turns it into an orderly shutdown.
volatile sig_atomic_t g_stop_signal = 0;
void on_signal(int) {
  g_stop_signal = 1;
}

}  // namespace

int cmd_serve(const std::vector<std::string>& args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  specs.push_back({"host", FlagKind::kString, "127.0.0.1",
                   "address to listen on (loopback by default; 0.0.0.0 for every interface)"});
  specs.push_back({"port", FlagKind::kInt, "8000", "TCP port to listen on", 1, 65535});
  specs.push_back({"api-key", FlagKind::kString, "",
                   "require 'Authorization: Bearer KEY' on the /v1 endpoints, /tokenize and "
                   "/detokenize"});
  specs.push_back({"served-model-name", FlagKind::kString, "",
                   "the model name clients send (default: the --model directory's last part)"});
  specs.push_back({"default-thinking", FlagKind::kBool, "",
                   "chat requests think unless chat_template_kwargs turns it off (default: "
                   "non-thinking chat mode)"});
  specs.push_back({"max-queue", FlagKind::kInt, "256",
                   "most requests queued or waiting for a sequence slot; more get HTTP 429", 1,
                   1 << 24});
  specs.push_back({"max-body-bytes", FlagKind::kInt, "1048576",
                   "largest request body; larger ones get HTTP 400", 1024, 1 << 30});
  specs.push_back({"max-n", FlagKind::kInt, "16", "largest n (choices per request)", 1, 1024});
  specs.push_back({"http-threads", FlagKind::kInt, "64",
                   "HTTP worker threads (each open request, streaming or not, holds one)", 1,
                   4096});
  specs.push_back({"debug-replay", FlagKind::kBool, "",
                   "tests only: requests may carry \"debug_replay_text\", which stands for the "
                   "model's output (exercises the reasoning and tool-call parsers)"});
  specs.push_back(add_bos_flag());
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe serve --model DIR [--pp N] [--host H] [--port P] [flags]\n%s",
                  f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("model")) return fail(Status::error("--model is required: a model directory"));
  auto text = ModelText::open(f.str("model"), f.str("add-bos"));
  if (!text) return fail(text.status());
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  std::string name = f.str("served-model-name");
  if (name.empty()) {
    name = f.str("model");
    while (name.size() > 1 && name.back() == '/') name.pop_back();
    if (auto p = name.rfind('/'); p != std::string::npos) name = name.substr(p + 1);
  }
  server::ServerOptions opt;
  opt.host = f.str("host");
  opt.port = static_cast<int>(f.i64("port"));
  opt.api_key = f.str("api-key");
  opt.max_body_bytes = f.i64("max-body-bytes");
  opt.http_threads = static_cast<int>(f.i64("http-threads"));
  opt.seed = static_cast<uint64_t>(f.i64("seed"));
  opt.eos_id = cfg->eos_token_id;
  opt.limits.model_name = name;
  opt.limits.max_model_len = f.i64("max-model-len");
  opt.limits.vocab_size = cfg->vocab_size;
  opt.limits.max_n = static_cast<int>(f.i64("max-n"));
  opt.limits.default_thinking = f.boolean("default-thinking");
  opt.limits.allow_replay = f.boolean("debug-replay");

  EngineLoop loop(static_cast<int>(f.i64("max-queue")));
  std::unique_ptr<server::Server> http;
  std::thread watcher;
  std::atomic<bool> done{false};
  Job job;
  job.add_requests = [](Scheduler&) { return Status::ok(); };
  job.hooks = [&](const StageEnv& env) {
    StageHooks h;
    if (env.stage != 0) return h;
    h = loop.hooks();
    http = std::make_unique<server::Server>(opt, loop, **text, env.topo.world);
    if (Status st = http->start(); !st) env.transport->fail(st.message(), 2);
    const int slots = env.model->limits().snapshot_slots;
    std::printf("serving %s on http://%s:%d (%d stage%s, %d state blocks of %d tokens, %s)\n",
                name.c_str(), opt.host.c_str(), opt.port, env.topo.world,
                env.topo.world > 1 ? "s" : "", env.model->num_blocks(), env.model->block_tokens(),
                slots > 0 ? str("prefix caching with ", slots, " snapshot slots").c_str()
                          : "prefix caching off");
    std::fflush(stdout);
    struct sigaction sa = {};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    watcher = std::thread([&] {
      while (!done.load() && !g_stop_signal)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (g_stop_signal) std::fprintf(stderr, "shutting down\n");
      http->stop();
      loop.shutdown();
    });
    return h;
  };
  job.finish = [&](const StageEnv& env, const std::vector<StageReport>&) -> int {
    if (env.stage != 0) return 0;  // the watcher and the HTTP server belong to stage 0
    done = true;
    if (watcher.joinable()) watcher.join();
    return 0;
  };
  return run_job(f, job);
}

}  // namespace sp
