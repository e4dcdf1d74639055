#include "server/server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdlib>

#include "text/tokenizer.h"

namespace sp::server {

Server::Server(ServerOptions opt, EngineLoop& loop, const ModelText& text, int num_stages)
    : opt_(std::move(opt)),
      loop_(loop),
      text_(text),
      metrics_(num_stages),
      http_(std::make_unique<httplib::Server>()) {}

Server::~Server() {
  stop();
}

void Server::send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(error_body(e).dump(-1, ' ', false, Json::error_handler_t::replace),
                  "application/json");
}

bool Server::authorized(const httplib::Request& req, httplib::Response& res) {
  if (opt_.api_key.empty()) return true;
  if (req.get_header_value("Authorization") == "Bearer " + opt_.api_key) return true;
  ApiError e;
  e.status = 401;
  e.type = "authentication_error";
  e.code = "invalid_api_key";
  e.message = "missing or wrong API key: send 'Authorization: Bearer <key>'";
  send_error(res, e);
  return false;
}

void Server::routes() {
  httplib::Server& s = *http_;
  const int threads = opt_.http_threads;
  s.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  // Bodies over the limit are read only up to a hard cap, and refused as a 400 by the handlers.
  s.set_payload_max_length(static_cast<size_t>(opt_.max_body_bytes) * 4 + 4096);
  s.set_read_timeout(30, 0);
  s.set_write_timeout(30, 0);
  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const bool ready = loop_.stats().ready;
    res.status = ready ? 200 : 503;
    res.set_content(ready ? "" : "loading", "text/plain");
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.render(loop_.stats()), "text/plain; version=0.0.4");
  });
  s.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    Json m{{"id", opt_.limits.model_name},
           {"object", "model"},
           {"created", 0},
           {"owned_by", "seekpipe"},
           {"max_model_len", opt_.limits.max_model_len}};
    res.set_content(Json{{"object", "list"}, {"data", Json::array({m})}}.dump(),
                    "application/json");
  });
  s.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) generate(req, res, false);
  });
  s.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) generate(req, res, true);
  });
  s.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) tokenize(req, res);
  });
  s.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) detokenize(req, res);
  });
}

namespace {

// cpp-httplib listens with a backlog of 5 (compiled into Debian's library), so a burst of clients
// connecting at once sees connection resets. A second listen() on the listening socket only
// updates its backlog: find the socket bound to our port and raise it.
void raise_listen_backlog(int port) {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return;
  while (dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0') continue;
    int listening = 0;
    socklen_t len = sizeof listening;
    if (getsockopt(static_cast<int>(fd), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 ||
        !listening)
      continue;
    sockaddr_storage addr{};
    socklen_t alen = sizeof addr;
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&addr), &alen) != 0) continue;
    int bound = -1;
    if (addr.ss_family == AF_INET) bound = ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
    if (addr.ss_family == AF_INET6)
      bound = ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
    if (bound == port) listen(static_cast<int>(fd), SOMAXCONN);
  }
  closedir(dir);
}

}  // namespace

Status Server::start() {
  routes();
  if (!http_->bind_to_port(opt_.host.c_str(), opt_.port))
    return Status::error(str("cannot listen on ", opt_.host, ":", opt_.port,
                             " (in use, or not an address of this machine)"));
  port_ = opt_.port;
  raise_listen_backlog(port_);
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  return Status::ok();
}

void Server::stop() {
  if (http_) http_->stop();
  if (thread_.joinable()) thread_.join();
}

namespace {

std::optional<ApiError> parse_object(const std::string& body, int64_t max_bytes, Json* out) {
  ApiError e;
  if (static_cast<int64_t>(body.size()) > max_bytes) {
    e.param = "body";
    e.code = "body_too_large";
    e.message = str("the request body is ", body.size(), " bytes; at most ", max_bytes,
                    " are accepted (--max-body-bytes)");
    return e;
  }
  try {
    *out = Json::parse(body);
  } catch (const Json::exception& x) {
    e.code = "invalid_json";
    e.message = str("the body is not valid JSON: ", x.what());
    return e;
  }
  if (!out->is_object()) {
    e.code = "invalid_json";
    e.message = "the body must be a JSON object";
    return e;
  }
  return std::nullopt;
}

}  // namespace

// As vLLM: {"prompt": str} or {"messages": [...]} (chat template applied), optional
// "add_special_tokens" (default true); answers {"count", "max_model_len", "tokens"}.
void Server::tokenize(const httplib::Request& req, httplib::Response& res) {
  Json b;
  if (auto e = parse_object(req.body, opt_.max_body_bytes, &b)) return send_error(res, *e);
  ApiError e;
  if (b.contains("model") && b["model"] != opt_.limits.model_name) {
    e.param = "model";
    e.code = "model_not_found";
    e.message = str("the model ", b["model"].dump(), " does not exist");
    return send_error(res, e);
  }
  bool special = b.value("add_special_tokens", Json(true)).is_boolean()
                     ? b.value("add_special_tokens", true)
                     : true;
  Result<std::vector<int32_t>> ids = std::vector<int32_t>{};
  if (b.contains("prompt")) {
    if (!b["prompt"].is_string()) {
      e.param = "prompt";
      e.code = "invalid_type";
      e.message = "'prompt' must be a string";
      return send_error(res, e);
    }
    const std::string p = b["prompt"].get<std::string>();
    ids = special && !p.empty() ? text_.encode(p) : text_.tokenizer()->encode(p);
  } else if (b.contains("messages")) {
    chat::ChatOptions opt;
    opt.thinking = opt_.limits.default_thinking;
    if (b.contains("chat_template_kwargs"))
      if (Status st = chat::apply_chat_template_kwargs(b["chat_template_kwargs"], &opt); !st) {
        e.param = "chat_template_kwargs";
        e.message = st.message();
        return send_error(res, e);
      }
    auto rendered = chat::encode_chat(b["messages"], b.value("tools", Json()), opt);
    if (!rendered) {
      e.param = "messages";
      e.message = rendered.status().message();
      return send_error(res, e);
    }
    ids = text_.tokenizer()->encode(*rendered);
  } else {
    e.param = "prompt";
    e.code = "missing_required_parameter";
    e.message = "give 'prompt' (a string) or 'messages'";
    return send_error(res, e);
  }
  if (!ids) {
    e.param = "prompt";
    e.message = ids.status().message();
    return send_error(res, e);
  }
  Json out{{"count", ids->size()}, {"max_model_len", opt_.limits.max_model_len}, {"tokens", *ids}};
  res.set_content(out.dump(), "application/json");
}

// As vLLM: {"tokens": [ids]} -> {"prompt": text}.
void Server::detokenize(const httplib::Request& req, httplib::Response& res) {
  Json b;
  if (auto e = parse_object(req.body, opt_.max_body_bytes, &b)) return send_error(res, *e);
  ApiError e;
  e.param = "tokens";
  if (!b.contains("tokens") || !b["tokens"].is_array()) {
    e.code = "invalid_type";
    e.message = "'tokens' must be a list of token ids";
    return send_error(res, e);
  }
  std::vector<int32_t> ids;
  for (auto& t : b["tokens"]) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 ||
        t.get<int64_t>() >= opt_.limits.vocab_size) {
      e.message =
          str("'tokens' must hold token ids in [0, ", opt_.limits.vocab_size, "), got ", t.dump());
      return send_error(res, e);
    }
    ids.push_back(t.get<int32_t>());
  }
  res.set_content(Json{{"prompt", text_.tokenizer()->decode(ids)}}.dump(
                      -1, ' ', false, Json::error_handler_t::replace),
                  "application/json");
}

}  // namespace sp::server
