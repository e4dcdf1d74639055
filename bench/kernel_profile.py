#!/usr/bin/env python3
"""Per-kernel table of one profiled decode step: reads the CSV that
`ncu --csv --profile-from-start off --metrics gpu__time_duration.sum ... seekpipe_bench_model
--profile-step N` prints, sums the kernel time by kernel (template arguments folded), and prints
the table sorted by time with each kernel's share of the step's total kernel time.

  python3 bench/kernel_profile.py ncu.csv [--wall-ms 3.9]
"""
import argparse
import csv
import re
import sys
from collections import defaultdict


def short(name):
    # ncu writes an anonymous namespace as "<unnamed>::" or "unnamed>::" (not template arguments)
    name = re.sub(r"<?unnamed>::", "", name.replace("(anonymous namespace)::", ""))
    name = re.sub(r"\(.*$", "", name)  # arguments
    depth, out = 0, []
    for ch in name:  # template arguments folded
        if ch == "<":
            depth += 1
            if depth == 1:
                out.append("<>")
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    name = "".join(out)
    name = re.sub(r"^(void |sp::cuda::|\(anonymous namespace\)::)+", "", name)
    return name.replace("sp::cuda::", "").replace("(anonymous namespace)::", "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--wall-ms", type=float, default=0, help="the step's wall time, for the gap")
    a = ap.parse_args()
    rows = []
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prints log lines before the CSV
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "nsecond")
        v = float(r["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(unit, 1e-3)
        rows.append((short(r["Kernel Name"]), v * scale))
    if not rows:
        print("no kernel rows in", a.csv)
        return 1
    tot, cnt = defaultdict(float), defaultdict(int)
    for k, us in rows:
        tot[k] += us
        cnt[k] += 1
    total = sum(tot.values())
    print(f"{len(rows)} kernels, {total:.1f} us of kernel time in the profiled step")
    if a.wall_ms > 0:
        print(f"step wall time {a.wall_ms * 1e3:.1f} us: {a.wall_ms * 1e3 - total:.1f} us not in kernels "
              "(launch gaps, host work)")
    print(f"| kernel | launches | us | share |\n|---|---|---|---|")
    for k in sorted(tot, key=lambda k: -tot[k]):
        print(f"| {k} | {cnt[k]} | {tot[k]:.1f} | {100 * tot[k] / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
