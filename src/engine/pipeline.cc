#include "engine/pipeline.h"

#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>

#include "engine/step_codec.h"

namespace sp {

namespace {

using Clock = std::chrono::steady_clock;

class Timeline {
 public:
  Timeline(bool keep, int stage) : keep_(keep), t0_(Clock::now()) { report.stage = stage; }
  double now_us() const {
    return std::chrono::duration<double, std::micro>(Clock::now() - t0_).count();
  }
  void add(const char* name, int64_t step, double start) {
    double end = now_us();
    if (std::strcmp(name, "compute") == 0) report.busy_s += (end - start) * 1e-6;
    if (keep_) report.events.push_back({name, step, start, end - start});
  }
  void finish() { report.wall_s = now_us() * 1e-6; }
  StageReport report;

 private:
  bool keep_;
  Clock::time_point t0_;
};

std::vector<uint8_t> encode_report(const StageReport& r) {
  std::vector<uint8_t> out;
  auto put = [&](const void* p, size_t n) {
    out.insert(out.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
  };
  put(&r.stage, sizeof r.stage);
  put(&r.busy_s, sizeof r.busy_s);
  put(&r.wall_s, sizeof r.wall_s);
  put(&r.steps, sizeof r.steps);
  put(&r.tokens, sizeof r.tokens);
  uint64_t n = r.events.size();
  put(&n, sizeof n);
  for (auto& e : r.events) {
    uint8_t len = static_cast<uint8_t>(e.name.size());
    put(&len, 1);
    put(e.name.data(), len);
    put(&e.step, sizeof e.step);
    put(&e.start_us, sizeof e.start_us);
    put(&e.dur_us, sizeof e.dur_us);
  }
  return out;
}

StageReport decode_report(const std::vector<uint8_t>& b) {
  StageReport r;
  size_t p = 0;
  auto get = [&](void* dst, size_t n) {
    SP_CHECK(p + n <= b.size(), "truncated stage report");
    std::memcpy(dst, b.data() + p, n);
    p += n;
  };
  get(&r.stage, sizeof r.stage);
  get(&r.busy_s, sizeof r.busy_s);
  get(&r.wall_s, sizeof r.wall_s);
  get(&r.steps, sizeof r.steps);
  get(&r.tokens, sizeof r.tokens);
  uint64_t n;
  get(&n, sizeof n);
  r.events.resize(n);
  for (auto& e : r.events) {
    uint8_t len;
    get(&len, 1);
    e.name.resize(len);
    get(e.name.data(), len);
    get(&e.step, sizeof e.step);
    get(&e.start_us, sizeof e.start_us);
    get(&e.dur_us, sizeof e.dur_us);
  }
  return r;
}

void maybe_fault(const PipelineOptions& opt, Transport& tr, int stage, int64_t step) {
  if (opt.fault.stage != stage || opt.fault.step != step) return;
  if (opt.fault.kill && tr.name() == "mpi") raise(SIGKILL);  // dies like a crashed process
  tr.fail(str("stage ", stage, " (rank ", tr.rank(), ") failed: injected fault at step ", step), 3);
}

}  // namespace

Status run_stage(Model& model, const Topology& topo, Transport& tr, Scheduler* sched,
                 const StageHooks& hooks, const PipelineOptions& opt,
                 std::vector<StageReport>* all) {
  const int s = topo.rank, P = topo.world, last = P - 1;
  const int64_t width = model.config().hc_dim();
  const bool first = s == 0, is_last = s == last;
  Timeline tl(opt.trace, s);
  Sampler sampler;
  std::vector<float> host_logits, buf;
  std::vector<uint8_t> header;
  StepPlan incoming;
  auto fail = [&](const std::string& what) {
    tr.fail(str("stage ", s, " (rank ", tr.rank(), "): ", what), 4);
  };
  auto compute = [&](const StepPlan& plan, Tensor X) {
    double t = tl.now_us();
    if (first) model.embed(plan.batch, X);
    LayerHook lh;
    if (hooks.hook) lh = [&](int layer, Tensor x) { hooks.hook(plan, layer, x); };
    model.run_layers(plan.batch, X, lh);
    std::vector<Sampled> sampled;
    if (is_last) {
      sampled = finish_step_on_head(model, plan, X, sampler, host_logits, hooks.on_logits);
      if (hooks.on_sampled)
        for (const Sampled& t : sampled) hooks.on_sampled(t);
    }
    tl.add("compute", plan.id, t);
    tl.report.steps++;
    tl.report.tokens += plan.batch.num_tokens;
    return sampled;
  };
  auto send_step = [&](const StepPlan& plan, Tensor X) {
    double t = tl.now_us();
    buf.resize(static_cast<size_t>(X.rows * X.cols));
    model.backend().to_host(X, buf.data());
    Status st = tr.send(s + 1, Channel::kStep, encode_step(plan), buf.data(),
                        static_cast<int64_t>(buf.size()));
    if (!st) fail(st.message());
    tl.add("send", plan.id, t);
  };
  if (first) {
    SP_CHECK(sched != nullptr, "stage 0 needs the scheduler");
    const int mb = opt.micro_batches > 0 ? opt.micro_batches : P;
    std::deque<StepPlan> in_flight;
    auto apply_result = [&](bool block) -> bool {
      if (in_flight.empty()) return false;
      if (!block && !tr.ready(last, Channel::kSampled)) return false;
      double t = tl.now_us();
      Status st = tr.recv(last, Channel::kSampled, header, nullptr, buf);
      if (!st) fail(st.message());
      tl.add(block ? "wait" : "receive", in_flight.front().id, t);
      int64_t id = -1;
      auto sampled = decode_sampled(header, &id);
      if (!sampled) fail(sampled.status().message());
      if (id != in_flight.front().id)
        fail(str("results arrived out of order: step ", id, ", expected ", in_flight.front().id));
      sched->complete(in_flight.front(), sampled.value());
      in_flight.pop_front();
      return true;
    };
    while (true) {
      while (P > 1 && apply_result(false)) {
      }
      if (sched->idle() && in_flight.empty()) break;
      if (static_cast<int>(in_flight.size()) < mb) {
        // Spread the ready tokens over the free micro-batch slots.
        const int64_t free_slots = mb - static_cast<int64_t>(in_flight.size());
        const int cap = static_cast<int>(
            std::max<int64_t>(1, (sched->ready_tokens() + free_slots - 1) / free_slots));
        StepPlan plan = sched->schedule(cap);
        if (!plan.empty()) {
          maybe_fault(opt, tr, s, plan.id);
          Tensor X = model.residual(plan.batch.num_tokens);
          auto sampled = compute(plan, X);
          if (P == 1) {
            sched->complete(plan, sampled);
          } else {
            send_step(plan, X);
            in_flight.push_back(std::move(plan));
          }
          continue;
        }
      }
      SP_CHECK(P > 1 && !in_flight.empty(), "no work can be scheduled and none is in flight");
      apply_result(true);
    }
    if (P > 1) {
      Status st = tr.send(1, Channel::kStep, encode_stop(), nullptr, 0);
      if (!st) fail(st.message());
    }
  } else {
    while (true) {
      double t = tl.now_us();
      StepKind kind = StepKind::kStop;
      Status st = tr.recv(
          s - 1, Channel::kStep, header,
          [&](const std::vector<uint8_t>& h) -> int64_t {
            auto p = decode_step(h, &kind);
            if (!p) return -1;
            incoming = std::move(p.value());
            return kind == StepKind::kStep ? incoming.batch.num_tokens * width : 0;
          },
          buf);
      if (!st) fail(st.message());
      if (kind == StepKind::kStop) {
        if (!is_last) {
          Status fs = tr.send(s + 1, Channel::kStep, header, nullptr, 0);
          if (!fs) fail(fs.message());
        }
        break;
      }
      tl.add("wait", incoming.id, t);
      maybe_fault(opt, tr, s, incoming.id);
      Tensor X = model.residual(incoming.batch.num_tokens);
      model.backend().from_host(buf.data(), X);
      auto sampled = compute(incoming, X);
      if (is_last) {
        double ts = tl.now_us();
        Status ss = tr.send(0, Channel::kSampled, encode_sampled(incoming.id, sampled), nullptr, 0);
        if (!ss) fail(ss.message());
        tl.add("send", incoming.id, ts);
      } else {
        send_step(incoming, X);
      }
    }
  }
  tl.finish();
  // Reports travel to the last stage for the run summary and the trace.
  if (!is_last) {
    Status st = tr.send(last, Channel::kReport, encode_report(tl.report), nullptr, 0);
    if (!st) fail(st.message());
    return Status::ok();
  }
  if (all) {
    all->assign(P, StageReport{});
    (*all)[last] = tl.report;
    for (int r = 0; r < last; ++r) {
      Status st = tr.recv(r, Channel::kReport, header, nullptr, buf);
      if (!st) fail(st.message());
      StageReport rep = decode_report(header);
      (*all)[rep.stage] = std::move(rep);
    }
  }
  return Status::ok();
}

}  // namespace sp
