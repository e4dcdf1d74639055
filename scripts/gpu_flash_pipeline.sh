#!/usr/bin/env bash
# DeepSeek-V4-Flash at full size (the released config, upstream FP8/FP4 formats, --load-format
# dummy) split over this machine's GPUs, one stage per GPU: the GPU pipeline's measurements of
# docs/benchmarks.md. Builds what it needs, then (each step skippable with STEP=0):
#   COPY    the copy bandwidth of one GPU (bench_ops) and the floor of a decode token: the weight
#           bytes it reads (`seekpipe inspect`) over that bandwidth;
#   NCCL    bench_nccl: NCCL send / receive between GPUs 0 and 1 at the boundary tensor's sizes
#           (one-way time and bandwidth), the reference for the stages' receive times;
#   PLAN    `seekpipe inspect`: the layers, memory and predicted time share of each stage, for
#           vLLM's split and --pp-partition auto;
#   SINGLE  one request alone (PROMPT tokens of prompt, OUTPUT new tokens), for each split in
#           SPLITS (default "vllm auto"): the time per generated token (the last stage's step
#           period over the decode steps, from the trace) and bench/trace_summary.py's per-stage
#           busy time, boundary receive time and bubble;
#   SERVE   `seekpipe bench offline`: random requests of IN / OUT tokens at each concurrency in
#           CONCURRENCY (default "32 64 128"), NUM_FACTOR x the concurrency requests each (default
#           2), after WARMUP requests (default: the concurrency); its report and the trace summary;
#   MTP     SINGLE again with --speculative mtp and K = 1 .. 3 draft tokens (dummy weights accept
#           nothing: the verify step's time, which the derived per-token time needs).
# Logs go to $OUT (default gpu-out/). PP (default: the number of GPUs), BUILD (default build-gpu).
# Usage: scripts/gpu_flash_pipeline.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
B=${BUILD:-build-gpu}
PP=${PP:-$(nvidia-smi -L | grep -c '^GPU')}
PROMPT=${PROMPT:-1024}
OUTPUT=${OUTPUT:-128}
SPLITS=${SPLITS:-vllm auto}
CONFIG=${CONFIG:-tests/data/configs/deepseek-v4-flash}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F), pp $PP"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_TEST_PYTHON=python3 >"$OUT/cmake.log" 2>&1 ||
  { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$B" -j "$(nproc)" --target seekpipe bench_ops >"$OUT/build.log" 2>&1 ||
  { grep -E "error|Error" "$OUT/build.log" | head -30; exit 1; }
echo "build ok ($SECONDS s)"
flash=(--model "$CONFIG" --load-format dummy --device cuda --pp "$PP")
ids() { python3 -c "import random; r=random.Random($1); print(','.join(str(r.randrange(129280)) for _ in range($2)))"; }
if [ "${COPY:-1}" = 1 ]; then
  BENCH_COPY_ONLY=1 timeout 120 "$B/bench/ops/bench_ops" | tee "$OUT/copy.log"
  gbs=$(sed -n 's/^copy 1 GB: \([0-9]*\) GB.*/\1/p' "$OUT/copy.log")
  bytes=$("$B/seekpipe" inspect --model "$CONFIG" --load-format dummy |
          sed -n 's/^weights one decode token reads.*: \([0-9.]*\) GB$/\1/p')
  [ -n "$gbs" ] && [ -n "$bytes" ] &&
    python3 -c "print('floor: %s GB a decode token / %s GB/s = %.3f ms' % ('$bytes', '$gbs', $bytes / $gbs * 1e3))" |
    tee "$OUT/floor.txt"
fi
if [ "${NCCL:-1}" = 1 ] && [ "$PP" -ge 2 ]; then
  # The boundary's reference: NCCL send / receive between GPUs 0 and 1 at its sizes.
  cmake --build "$B" --target bench_nccl >>"$OUT/build.log" 2>&1 &&
    timeout 120 "$B/bench_nccl" | tee "$OUT/nccl.log"
fi
if [ "${PLAN:-1}" = 1 ]; then
  for split in $SPLITS; do
    "$B/seekpipe" inspect --model "$CONFIG" --load-format dummy --pp "$PP" --pp-partition "$split" \
      --max-num-seqs 1 --max-model-len $((PROMPT + OUTPUT + 64)) | sed -n '/^pipeline plan/,$p' |
      tee "$OUT/plan_$split.txt"
  done
fi
if [ "${SINGLE:-1}" = 1 ]; then
  prompt=$(ids 7 "$PROMPT")
  for split in $SPLITS; do
    log="$OUT/single_$split.log"
    timeout 400 "$B/seekpipe" generate "${flash[@]}" --pp-partition "$split" --max-num-seqs 1 \
      --max-model-len $((PROMPT + OUTPUT + 64)) --prompt-ids "$prompt" --max-tokens "$OUTPUT" \
      --ignore-eos --trace "$OUT/single_$split.trace.json" >"$log" 2>&1
    echo "single request, $split split: exit $? ($SECONDS s)"
    grep -E "^generated|^pipeline|^boundary|^cuda graphs|^error|memory" "$log"
    # Step 0 is the prefill (one chunk of PROMPT tokens); the decode steps follow.
    python3 bench/trace_summary.py "$OUT/single_$split.trace.json" --from-step 2 | tee "$OUT/single_$split.md"
  done
fi
if [ "${MTP:-1}" = 1 ]; then
  prompt=$(ids 7 "$PROMPT")
  for k in ${MTP_K:-1 2 3}; do
    log="$OUT/mtp_k$k.log"
    timeout 400 "$B/seekpipe" generate "${flash[@]}" --pp-partition "${MTP_SPLIT:-vllm}" --max-num-seqs 1 \
      --max-model-len $((PROMPT + OUTPUT + 64)) --prompt-ids "$prompt" --max-tokens "$OUTPUT" \
      --ignore-eos --speculative mtp --num-speculative-tokens "$k" --trace "$OUT/mtp_k$k.trace.json" >"$log" 2>&1
    echo "mtp K=$k: exit $? ($SECONDS s)"
    grep -E "^generated|^speculative|^pipeline|^cuda graphs|^error" "$log"
    python3 bench/trace_summary.py "$OUT/mtp_k$k.trace.json" --from-step 2 | tee "$OUT/mtp_k$k.md"
  done
fi
if [ "${SERVE:-1}" = 1 ]; then
  IN=${IN:-8192} OUTLEN=${OUTLEN:-1024}
  for c in ${CONCURRENCY:-32 64 128}; do
    log="$OUT/serve_c$c.log"
    timeout "${SERVE_TIMEOUT:-580}" "$B/seekpipe" bench offline "${flash[@]}" --pp-partition "${SERVE_SPLIT:-vllm}" \
      --max-num-seqs "$c" --max-model-len $((IN + OUTLEN + 64)) --random-input-len "$IN" \
      --random-output-len "$OUTLEN" --num-prompts $((c * ${NUM_FACTOR:-2})) --max-concurrency "$c" \
      --num-warmups "${WARMUP:-$c}" --trace "$OUT/serve_c$c.trace.json" --result-json "$OUT/serve_c$c.result.json" \
      ${SERVE_FLAGS:-} >"$log" 2>&1
    echo "bench offline, concurrency $c: exit $? ($SECONDS s)"
    sed -n '/Serving Benchmark Result/,/E2E/p' "$log"
    grep -E "^pipeline|^cuda graphs|^error" "$log"
    [ -f "$OUT/serve_c$c.trace.json" ] && python3 bench/trace_summary.py "$OUT/serve_c$c.trace.json" | tee "$OUT/serve_c$c.md"
  done
fi
