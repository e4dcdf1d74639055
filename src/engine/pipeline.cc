#include "engine/pipeline.h"

#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <thread>

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
  put(&r.prefix_queries, sizeof r.prefix_queries);
  put(&r.prefix_hits, sizeof r.prefix_hits);
  put(&r.host_bytes, sizeof r.host_bytes);
  put(&r.device_bytes, sizeof r.device_bytes);
  put(&r.graph_steps, sizeof r.graph_steps);
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
  get(&r.prefix_queries, sizeof r.prefix_queries);
  get(&r.prefix_hits, sizeof r.prefix_hits);
  get(&r.host_bytes, sizeof r.host_bytes);
  get(&r.device_bytes, sizeof r.device_bytes);
  get(&r.graph_steps, sizeof r.graph_steps);
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

void maybe_fault(const PipelineOptions& opt, Transport& tr, int stage, int64_t step, Backend& be,
                 DeviceLink* link) {
  if (opt.fault.stage != stage || opt.fault.step != step) return;
  if (opt.fault.cuda || opt.fault.nccl) {  // the stage goes on; what it broke shows up elsewhere
    std::fprintf(stderr, "stage %d: injected %s fault at step %lld\n", stage,
                 opt.fault.cuda ? "CUDA" : "NCCL", static_cast<long long>(step));
    std::fflush(stderr);
    if (opt.fault.cuda) be.inject_device_fault();
    if (opt.fault.nccl && link) link->drop_sends();
    return;
  }
  if (opt.fault.kill && tr.name() == "mpi") raise(SIGKILL);  // dies like a crashed process
  if (opt.fault.stall) {  // stops like a hung process; only the watchdog notices
    std::fprintf(stderr, "stage %d: injected stall at step %lld\n", stage,
                 static_cast<long long>(step));
    std::fflush(stderr);
    if (tr.name() == "mpi") raise(SIGSTOP);
    while (true) std::this_thread::sleep_for(std::chrono::hours(1));
  }
  tr.fail(str("stage ", stage, " (rank ", tr.rank(), ") failed: injected fault at step ", step), 3);
}

// A forward pass that produced a NaN or an Inf is an error naming where it first appeared.
std::string non_finite_message(const Model& model, int where, int64_t step) {
  const std::string at = where == Backend::kNonFiniteEmbedding ? std::string("the embedding")
                         : where == Backend::kNonFiniteHead    ? std::string("the head (logits)")
                         : where == model.config().num_layers
                             ? std::string("the MTP draft layer (its output streams)")
                             : str("layer ", where, " (its output residual)");
  return str("non-finite values (NaN or Inf) first appear in ", at, " at step ", step,
             ": the weights there, or an activation overflowing fp32");
}

}  // namespace

namespace {

// One stage's side of the pipeline: stage 0 schedules and feeds, the others receive, compute and
// pass on; the last stage samples and sends the tokens back.
class StageRunner {
 public:
  StageRunner(Model& model, const Topology& topo, Transport& tr, Scheduler* sched,
              const StageHooks& hooks, const PipelineOptions& opt, DeviceLink* link)
      : model_(model),
        tr_(tr),
        link_(link),
        sched_(sched),
        hooks_(hooks),
        opt_(opt),
        s_(topo.rank),
        P_(topo.world),
        last_(topo.world - 1),
        tl_(opt.trace, topo.rank),
        head_(model, hooks.drafter) {}

  void run() {
    if (s_ == 0) {
      run_first();
      if (const PrefixCache* pc = sched_->prefix_cache()) {
        tl_.report.prefix_queries = pc->stats.queries;
        tl_.report.prefix_hits = pc->stats.hits;
      }
    } else
      run_downstream();
    tl_.finish();
  }
  // Reports travel to the last stage for the run summary and the trace.
  void exchange_reports(std::vector<StageReport>* all) {
    tl_.report.host_bytes = tr_.host_payload_bytes();
    tl_.report.device_bytes = link_ ? link_->device_bytes() : 0;
    tl_.report.graph_steps = model_.backend().graph_replays();
    if (s_ != last_) {
      check(tr_.send(last_, Channel::kReport, encode_report(tl_.report), nullptr, 0));
      return;
    }
    if (!all) return;
    all->assign(P_, StageReport{});
    (*all)[last_] = tl_.report;
    for (int r = 0; r < last_; ++r) {
      check(tr_.recv(r, Channel::kReport, header_, nullptr, buf_));
      StageReport rep = decode_report(header_);
      (*all)[rep.stage] = std::move(rep);
    }
  }

 private:
  bool is_first() const { return s_ == 0; }
  bool is_last() const { return s_ == last_; }
  int micro_batches() const { return opt_.micro_batches > 0 ? opt_.micro_batches : P_; }
  // The residual buffer of a step: steps in flight have consecutive ids, at most micro_batches of
  // them, so id modulo the buffer count never reuses a buffer still being sent.
  int slot(const StepPlan& plan) const {
    return static_cast<int>(plan.id % std::max(1, micro_batches()));
  }
  Tensor residual(const StepPlan& plan) {
    return model_.residual(slot(plan), plan.batch.num_tokens);
  }
  void check(const Status& st) {
    if (!st) tr_.fail(str("stage ", s_, " (rank ", tr_.rank(), "): ", st.message()), 4);
  }

  StepOutput compute(const StepPlan& plan, Tensor X) {
    double t = tl_.now_us();
    // Prefix-cache restores before the step's layers, snapshots after (this stage's layers only).
    for (const SlotCopy& c : plan.copies_before) model_.copy_slot(c.src, c.dst);
    model_.begin_step(plan.batch);
    if (is_first()) model_.embed(plan.batch, X);
    LayerHook lh;
    if (hooks_.hook) lh = [&](int layer, Tensor x) { hooks_.hook(plan, layer, x); };
    model_.run_layers(plan.batch, X, lh);
    StepOutput out;
    if (is_last()) {
      out = head_.finish(plan, X, hooks_.on_logits);
      tl_.report.spec = head_.spec_counters();
      if (hooks_.on_sampled)
        for (const Sampled& t : out.sampled) hooks_.on_sampled(t);
    }
    // Snapshots after everything this stage runs for the step (the MTP layer's pass included).
    for (const SlotCopy& c : plan.copies_after) model_.copy_slot(c.src, c.dst);
    // The host transport's copy of the boundary tensor brings the non-finite flag back with it
    // (the last stage's does with the sampled ids). Reading the flag waits for the step's
    // kernels, so on a GPU the "compute" span (busy time, the trace) covers the device's work,
    // not just its launches; nothing is lost, the send waits for those kernels anyway.
    if (!is_last() && !link_) {
      buf_.resize(static_cast<size_t>(X.numel() * X.elem_size()));
      model_.backend().to_host(X, buf_.data());
    }
    check_finite(plan);
    tl_.add("compute", plan.id, t);
    tl_.report.steps++;
    tl_.report.tokens += plan.batch.num_tokens;
    return out;
  }

  // A GPU backend brings its non-finite flag back with the step's device-to-host copy (sampled
  // ids, or the boundary tensor): asked after that copy, the check waits for nothing more.
  void check_finite(const StepPlan& plan) {
    int w = is_last() ? head_.target_non_finite() : Backend::kAllFinite;
    if (w == Backend::kAllFinite) w = model_.backend().non_finite_where();
    if (w != Backend::kAllFinite) check(Status::error(non_finite_message(model_, w, plan.id)));
  }

  // This stage's (busy, wall) seconds, appended to what a step carries down the pipeline.
  void stamp(StepPlan& plan) {
    plan.stage_times.push_back(tl_.report.busy_s);
    plan.stage_times.push_back(tl_.now_us() * 1e-6);
  }

  void send_step(StepPlan& plan, Tensor X) {
    stamp(plan);
    double t = tl_.now_us();
    if (link_) {  // the descriptor through the host transport, the tensor device to device
      // Descriptor first: the receiver posts its receive when the descriptor arrives, and NCCL's
      // first send to a peer waits for that peer to join the connection. compute() has checked
      // the step's values: a broken step is named before it goes on.
      check(tr_.send(s_ + 1, Channel::kStep, encode_step(plan), nullptr, 0));
      check(link_->send(s_ + 1, X, slot(plan)));
      tl_.add("send", plan.id, t);
      return;
    }
    // compute() left the boundary tensor in buf_.
    check(tr_.send(s_ + 1, Channel::kStep, encode_step(plan), buf_.data(),
                   static_cast<int64_t>(buf_.size())));
    tl_.add("send", plan.id, t);
  }

  // Stage 0: applies the next sampled-token message from the last stage, if one is there (or
  // waits for it when `block`).
  bool apply_result(bool block) {
    if (in_flight_.empty()) return false;
    if (!block && !tr_.ready(last_, Channel::kSampled)) return false;
    double t = tl_.now_us();
    check(tr_.recv(last_, Channel::kSampled, header_, nullptr, buf_));
    tl_.add(block ? "wait" : "receive", in_flight_.front().id, t);
    int64_t id = -1;
    std::vector<double> times;
    std::vector<Drafted> drafts;
    auto sampled = decode_sampled(header_, &id, &times, &drafts);
    if (!sampled) check(sampled.status());
    if (id != in_flight_.front().id)
      check(Status::error(
          str("results arrived out of order: step ", id, ", expected ", in_flight_.front().id)));
    sched_->complete(in_flight_.front(), sampled.value(), drafts);
    if (hooks_.on_step) hooks_.on_step(*sched_, in_flight_.front(), sampled.value(), times);
    in_flight_.pop_front();
    return true;
  }

  void run_first() {
    SP_CHECK(sched_ != nullptr, "stage 0 needs the scheduler");
    const int mb = micro_batches();
    bool wait = false;
    // A batch job (no poll hook) applies results only when stage 0 must wait (every micro-batch
    // in flight, or nothing ready), never as they happen to arrive: its steps, their ids and
    // contents are the same in every run (--fault-inject S:STEP is reproducible). Serving applies
    // them as they arrive (its requests arrive at any time anyway; an early result is latency).
    while (true) {
      tr_.keep_alive();  // the watchdog: stage 0 idle between requests is not stalled
      while (P_ > 1 && hooks_.poll && apply_result(false)) {
      }
      const bool drained = sched_->idle() && in_flight_.empty();
      if (hooks_.poll) {
        const bool more = hooks_.poll(*sched_, wait || drained);
        wait = false;
        if (sched_->idle() && in_flight_.empty()) {
          if (!more) break;
          continue;
        }
      } else if (drained) {
        break;
      }
      if (static_cast<int>(in_flight_.size()) < mb) {
        // Spread the ready tokens over the free micro-batch slots.
        const int64_t free_slots = mb - static_cast<int64_t>(in_flight_.size());
        const int cap = static_cast<int>(
            std::max<int64_t>(1, (sched_->ready_tokens() + free_slots - 1) / free_slots));
        StepPlan plan = sched_->schedule(cap);
        if (!plan.empty()) {
          maybe_fault(opt_, tr_, s_, plan.id, model_.backend(), link_);
          Tensor X = residual(plan);
          if (link_) check(link_->reuse(slot(plan)));
          StepOutput out = compute(plan, X);
          if (P_ == 1) {
            sched_->complete(plan, out.sampled, out.drafts);
            if (hooks_.on_step) {
              stamp(plan);
              hooks_.on_step(*sched_, plan, out.sampled, plan.stage_times);
            }
          } else {
            send_step(plan, X);
            in_flight_.push_back(std::move(plan));
          }
          continue;
        }
      }
      if (in_flight_.empty()) {
        // Nothing could be scheduled: the scheduler may just have ended sequences, or (serving)
        // work waits on something the feed will bring.
        SP_CHECK(hooks_.poll || sched_->idle(), "no work can be scheduled and none is in flight");
        wait = true;
        continue;
      }
      apply_result(true);
    }
    if (P_ > 1) check(tr_.send(1, Channel::kStep, encode_stop(), nullptr, 0));
  }

  void run_downstream() {
    const int64_t row_bytes =
        model_.config().hc_dim() * dtype_size(model_.backend().residual_dtype());
    StepPlan incoming;
    while (true) {
      double t = tl_.now_us();
      StepKind kind = StepKind::kStop;
      check(tr_.recv(
          s_ - 1, Channel::kStep, header_,
          [&](const std::vector<uint8_t>& h) -> int64_t {
            auto p = decode_step(h, &kind);
            if (!p) return -1;
            incoming = std::move(p.value());
            return kind == StepKind::kStep && !link_ ? incoming.batch.num_tokens * row_bytes : 0;
          },
          buf_));
      if (kind == StepKind::kStop) {
        if (!is_last()) check(tr_.send(s_ + 1, Channel::kStep, header_, nullptr, 0));
        return;
      }
      tl_.add("wait", incoming.id, t);
      maybe_fault(opt_, tr_, s_, incoming.id, model_.backend(), link_);
      Tensor X = residual(incoming);
      if (link_) {
        const double tr = tl_.now_us();
        check(link_->recv(s_ - 1, X, slot(incoming), incoming.id));
        tl_.add("receive", incoming.id, tr);
      } else {
        model_.backend().from_host(buf_.data(), X);
      }
      StepOutput out = compute(incoming, X);
      if (link_) link_->computed(slot(incoming));
      if (is_last()) {
        stamp(incoming);
        double ts = tl_.now_us();
        check(tr_.send(0, Channel::kSampled,
                       encode_sampled(incoming.id, out.sampled, incoming.stage_times, out.drafts),
                       nullptr, 0));
        tl_.add("send", incoming.id, ts);
      } else {
        send_step(incoming, X);
      }
    }
  }

  Model& model_;
  Transport& tr_;
  DeviceLink* link_;  // null: the boundary tensor goes through tr_
  Scheduler* sched_;
  const StageHooks& hooks_;
  const PipelineOptions& opt_;
  const int s_, P_, last_;
  Timeline tl_;
  HeadStage head_;
  std::vector<uint8_t> buf_, header_;
  std::deque<StepPlan> in_flight_;  // stage 0: steps sent, tokens not back yet
};

}  // namespace

Status run_stage(Model& model, const Topology& topo, Transport& tr, Scheduler* sched,
                 const StageHooks& hooks, const PipelineOptions& opt, std::vector<StageReport>* all,
                 DeviceLink* link) {
  StageRunner runner(model, topo, tr, sched, hooks, opt, link);
  runner.run();
  runner.exchange_reports(all);
  return Status::ok();
}

}  // namespace sp
