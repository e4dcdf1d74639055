#!/usr/bin/env bash
# CPU pipeline benchmark: pp 1 vs pp 2 with one thread per stage (no oversubscription on a
# 2-core machine), several micro-batches, over threads and over mpirun; pp 1 with 2 threads is the
# peer on the same cores. Prints a markdown table for docs/benchmarks.md.
# usage: bench/pipeline_cpu.sh [BUILD_DIR]   (after `make build`; also needs bc and lscpu)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build}/seekpipe
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
prompts() {  # N LEN VOCAB: N prompts of LEN pseudo-random ids
  python3 - "$@" <<'PY'
import sys
n, l, v = map(int, sys.argv[1:])
print(" ".join("--prompt-ids " + ",".join(str((i * 7919 + j * 104729 + 17) % (v - 2) + 2) for j in range(l)) for i in range(n)))
PY
}
REPEATS=${REPEATS:-3}
row() {  # label, then the command; the run with the median run time of REPEATS is reported
  local label=$1; shift
  local out runs=() i
  for i in $(seq 1 "$REPEATS"); do
    runs+=("$("$@" 2>/dev/null)")
  done
  out=$(for r in "${runs[@]}"; do
          printf '%s\t%s\n' "$(grep '^generated' <<<"$r" | awk '{print $7}')" "$(base64 -w0 <<<"$r")"
        done | sort -g | sed -n "$(( (REPEATS + 1) / 2 ))p" | cut -f2 | base64 -d)
  local line gen steps secs toks pipe
  line=$(grep '^generated' <<<"$out")
  gen=$(awk '{print $2}' <<<"$line"); steps=$(awk '{print $5}' <<<"$line"); secs=$(awk '{print $7}' <<<"$line")
  toks=$(grep -o 'over [0-9]* prefill + [0-9]* decode' <<<"$line" | awk '{print $2 + $5}')
  pipe=$(grep '^pipeline:' <<<"$out" | sed 's/^pipeline: //; s/ ([0-9]* steps)//g' || true)
  printf '| %s | %s | %s | %.2f | %.1f | %.2f | %s |\n' "$label" "$steps" "$toks" "$secs" \
    "$(echo "$toks / $secs" | bc -l)" "$(echo "$gen / $secs" | bc -l)" "${pipe:--}"
}
run_case() {  # name model extra-flags prompts-args
  local name=$1 model=$2 flags=$3; shift 3
  local common="generate --model $model $flags --ignore-eos --threads 1 $*"
  echo
  echo "#### $name"
  echo
  echo "| run | steps | tokens through the model | run s | tokens/s | generated tokens/s | stage busy, bubble |"
  echo "|---|---|---|---|---|---|---|"
  row "pp 1, 1 thread" $bin $common
  row "pp 1, 2 threads (peer)" $bin ${common/--threads 1/--threads 2}
  row "pp 2 threads, 1 thread/stage, 2 micro-batches" $bin $common --pp 2
  row "pp 2 threads, 1 thread/stage, 4 micro-batches" $bin $common --pp 2 --micro-batches 4
  row "pp 2 mpirun, 1 thread/stage, 2 micro-batches" mpirun -np 2 $bin $common
}
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "commit: $(git rev-parse --short HEAD), date: $(date -u +%Y-%m-%d)"
echo "each row: the median of $REPEATS runs (small fixture) by run time; the dummy model runs once"
run_case "small fixture (6 layers, hidden 128): 16 prompts x 64 tokens, 64 new tokens each" \
  tests/data/small "--max-tokens 64 --max-num-seqs 16 --max-model-len 160" $(prompts 16 64 512)
REPEATS=1
run_case "dummy V4-Flash layer kinds at hidden 1024 (43 layers, FP8/FP4, 2.7 GiB): 8 prompts x 16 tokens, 12 new tokens each" \
  bench/configs/flash-1k "--load-format dummy --max-tokens 12 --max-num-seqs 8 --max-model-len 64" $(prompts 8 16 32768)
