#!/usr/bin/env python3
"""Per-stage busy fraction, bubble and boundary times from a seekpipe Chrome trace (--trace FILE).

Every stage records spans per step: "compute" (its layers; on a GPU the span ends when the step's
kernels have finished), "receive" (waiting for the boundary tensor: on the NCCL path the transfer
as the receiving stage sees it), "send", and "wait" (waiting for the previous stage's descriptor,
or stage 0 for sampled tokens). The summary is over a window: from the start of step --from-step
(default: the first step) to the end of the last span, so warm-up or prefill steps can be left out.
With two stages or more it ends with the stages' compute medians as `--stage-ms` for
`seekpipe inspect` (fitting the cost model's --pp-head-cost).

  python3 bench/trace_summary.py trace.json [--from-step N] [--json]
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        doc = json.load(f)
    spans = []
    for e in doc.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        spans.append((int(e["tid"]), e["cat"], int(e["args"]["micro_batch"]), float(e["ts"]),
                      float(e["dur"])))
    return spans


def summarise(spans, from_step):
    spans = [s for s in spans if s[2] >= from_step]
    if not spans:
        raise SystemExit(f"no spans at or after step {from_step}")
    t0 = min(s[3] for s in spans)
    t1 = max(s[3] + s[4] for s in spans)
    window = t1 - t0
    stages = sorted({s[0] for s in spans})
    out = {"window_ms": window / 1e3, "from_step": from_step, "stages": []}
    for st in stages:
        by = defaultdict(list)
        for s in spans:
            if s[0] == st:
                by[s[1]].append(s)
        compute = by["compute"]
        ends = sorted(s[3] + s[4] for s in compute)
        periods = [b - a for a, b in zip(ends, ends[1:])]
        row = {
            "stage": st,
            "steps": len(compute),
            "busy": sum(s[4] for s in compute) / window if window > 0 else 0.0,
            "compute_median_ms": statistics.median(s[4] for s in compute) / 1e3 if compute else 0,
            "step_period_median_ms": statistics.median(periods) / 1e3 if periods else 0,
        }
        for cat in ("receive", "send", "wait"):
            v = [s[4] for s in by[cat]]
            row[cat + "_median_ms"] = statistics.median(v) / 1e3 if v else 0.0
            row[cat + "_total_ms"] = sum(v) / 1e3
        out["stages"].append(row)
    out["bubble"] = 1 - sum(r["busy"] for r in out["stages"]) / len(out["stages"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--from-step", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args()
    try:
        s = summarise(load(a.trace), a.from_step)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {a.trace}: not a readable seekpipe trace ({e})")
    if a.json:
        print(json.dumps(s, indent=1))
        return
    print(f"window {s['window_ms']:.1f} ms from step {s['from_step']}; bubble {100 * s['bubble']:.1f}%")
    print("| stage | steps | busy | compute median (ms) | step period median (ms) |"
          " receive median (ms) | send median (ms) | wait median (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in s["stages"]:
        print(f"| {r['stage']} | {r['steps']} | {100 * r['busy']:.1f}% | {r['compute_median_ms']:.3f} |"
              f" {r['step_period_median_ms']:.3f} | {r['receive_median_ms']:.3f} |"
              f" {r['send_median_ms']:.3f} | {r['wait_median_ms']:.3f} |")
    # The stage times `seekpipe inspect --stage-ms` fits the head's cost to (--pp-head-cost).
    if len(s["stages"]) >= 2:
        print("--stage-ms " + ",".join(f"{r['compute_median_ms']:.3f}" for r in s["stages"]))


if __name__ == "__main__":
    main()
