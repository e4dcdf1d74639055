// `seekpipe serve`: the OpenAI-compatible HTTP server (cpp-httplib). HTTP threads never touch
// model state: generation requests go to the engine loop's queue (EngineLoop::submit) and their
// tokens come back through a per-request channel. docs/serving.md lists every endpoint, parameter
// and metric.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "engine/engine_loop.h"
#include "server/api.h"
#include "server/metrics.h"
#include "tools/text_commands.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace sp::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;
  std::string api_key;               // empty: no check
  int64_t max_body_bytes = 1 << 20;  // larger bodies are a 400
  int http_threads = 64;
  ServeLimits limits;
  uint64_t seed = 0;  // requests without a seed draw theirs from this
  int64_t eos_id = -1;
};

class Server {
 public:
  Server(ServerOptions opt, EngineLoop& loop, const ModelText& text, int num_stages);
  ~Server();
  // Binds and serves in a thread of its own.
  Status start();
  void stop();
  int port() const { return port_; }

 private:
  void routes();
  bool authorized(const httplib::Request& req, httplib::Response& res);
  void send_error(httplib::Response& res, const ApiError& e);
  void generate(const httplib::Request& req, httplib::Response& res, bool chat);
  void tokenize(const httplib::Request& req, httplib::Response& res);
  void detokenize(const httplib::Request& req, httplib::Response& res);

  ServerOptions opt_;
  EngineLoop& loop_;
  const ModelText& text_;
  Metrics metrics_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<uint64_t> seed_counter_{0};
};

}  // namespace sp::server
