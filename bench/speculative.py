#!/usr/bin/env python3
"""MTP speculative decoding benchmark: `seekpipe generate` on held-out KJV chapters, one request at
a time (single-request decode), greedy, without speculation and with K = 1, 2, 3 draft tokens.
Prints the acceptance rate, the mean accepted length (tokens per verify step), the engine's wall
time (median of the repeats) and the speed-up over no speculation, and checks that every run
produced the same tokens.

usage: bench/speculative.py SEEKPIPE MODEL_DIR HELD_OUT.jsonl [--prompts 8] [--max-tokens 128]
       [--repeats 3] [--threads 2] [--device cpu] [-- extra generate flags]
"""
import argparse
import json
import re
import statistics
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-chars", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", default="0,1,2,3")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    texts = []
    with open(a.data) as f:
        for line in f:
            texts.append(json.loads(line)["text"][: a.prompt_chars])
            if len(texts) == a.prompts:
                break
    base = [a.binary, "generate", "--device", a.device, "--model", a.model, "--max-tokens",
            str(a.max_tokens), "--ignore-eos", "--max-num-seqs", "1", "--threads", str(a.threads)]
    for t in texts:
        base += ["--prompt", t]
    base += a.extra
    rows, ref_ids, t0 = [], None, None
    for k in [int(x) for x in a.k.split(",")]:
        cmd = base + (["--speculative", "mtp", "--num-speculative-tokens", str(k)] if k else [])
        walls, out = [], ""
        for _ in range(a.repeats):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            walls.append(float(re.search(r"tokens in \d+ steps, ([0-9.]+) s", out).group(1)))
        ids = [l for l in out.splitlines() if "output ids" in l]
        if ref_ids is None:
            ref_ids = ids
        elif ids != ref_ids:
            sys.exit("K=%d: the tokens differ from the run without speculation" % k)
        steps = int(re.search(r"tokens in (\d+) steps", out).group(1))
        gen = int(re.search(r"generated (\d+) tokens", out).group(1))
        m = re.search(r"acceptance rate ([0-9.]+), mean accepted length ([0-9.]+)", out)
        wall = statistics.median(walls)
        t0 = t0 or wall
        rows.append((k, m.group(1) if m else "-", m.group(2) if m else "1", steps, gen, wall,
                     gen / wall, t0 / wall))
    print("| K | acceptance rate | mean accepted length | steps | tokens | wall s (median of %d) | "
          "tokens/s | speed-up |" % a.repeats)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %d | %s | %s | %d | %d | %.3f | %.1f | %.2fx |" % r)
    print("tokens identical in every run: yes")


if __name__ == "__main__":
    main()
