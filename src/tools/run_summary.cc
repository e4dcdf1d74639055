#include "tools/run_summary.h"

#include <cinttypes>
#include <cstdio>

#include "engine/trace.h"

namespace sp {

void print_prefix_summary(const std::vector<StageReport>& reports) {
  if (reports.empty() || reports.front().prefix_queries == 0) return;
  std::printf("prefix cache: %" PRId64 " of %" PRId64 " prompt tokens cached (%.1f%%)\n",
              reports.front().prefix_hits, reports.front().prefix_queries,
              100.0 * static_cast<double>(reports.front().prefix_hits) /
                  static_cast<double>(reports.front().prefix_queries));
}

void print_pipeline_summary(const std::vector<StageReport>& reports) {
  if (reports.size() < 2) return;
  double busy_sum = 0;
  std::printf("pipeline:");
  for (const StageReport& r : reports) {
    double busy = r.wall_s > 0 ? r.busy_s / r.wall_s : 0;
    busy_sum += busy;
    std::printf(" stage %d busy %.1f%% (%" PRId64 " steps)%s", r.stage, 100 * busy, r.steps,
                &r == &reports.back() ? "" : ",");
  }
  std::printf("; bubble %.1f%%\n", 100 * (1 - busy_sum / static_cast<double>(reports.size())));
  // Where the boundary tensors went: the NCCL path moves none through host memory.
  int64_t host = 0, device = 0;
  for (const StageReport& r : reports) {
    host += r.host_bytes;
    device += r.device_bytes;
  }
  std::printf("boundary: %" PRId64 " bytes device to device (nccl), %" PRId64
              " bytes through host memory\n",
              device, host);
}

void print_graph_summary(const std::vector<StageReport>& reports) {
  int64_t any = 0;
  for (const StageReport& r : reports) any += r.graph_steps;
  if (any == 0) return;
  std::printf("cuda graphs: decode steps replayed per stage");
  for (const StageReport& r : reports)
    std::printf(" %" PRId64 "%s", r.graph_steps, &r == &reports.back() ? "" : ",");
  std::printf("\n");
}

void print_spec_summary(const std::vector<StageReport>& reports) {
  if (reports.empty() || reports.back().spec.drafts == 0) return;
  const SpecCounters& s = reports.back().spec;
  std::printf("speculative: %" PRId64 " verify steps, %" PRId64 " draft tokens, %" PRId64
              " accepted: acceptance rate %.3f, mean accepted length %.3f\n",
              s.drafts, s.draft_tokens, s.accepted_tokens, s.acceptance_rate(),
              s.mean_accepted_length());
}

Status maybe_write_trace(const Flags& f, const std::vector<StageReport>& reports) {
  if (!f.given("trace")) return Status::ok();
  SP_RETURN_IF_ERROR(write_chrome_trace(f.str("trace"), reports));
  std::printf("trace written to %s\n", f.str("trace").c_str());
  return Status::ok();
}

}  // namespace sp
