#!/usr/bin/env bash
# The CUDA backend's benchmarks on one GPU (docs/benchmarks.md): builds the benchmark binaries and
# runs, writing logs to $OUT (default gpu-out/):
#   1. the ceilings and per-op tables (bench_ops: copy bandwidth, projections, MoE; bench_lt:
#      cuBLASLt FP8 / bf16 GEMM ceilings and the --activation-quant fp8 projections);
#   2. the whole model: V4-Flash's config with 4 layers, dummy weights, decode at batch 1, 8, 32, 64
#      with CONTEXT tokens of context (default 4096), prefill tokens/s with PREFILL-token steps;
#   3. one decode step at batch 1 and one PREFILL-token prefill step per kernel (ncu, if installed):
#      bench/kernel_profile.py's tables;
#   4. the peer: Hugging Face transformers on the same dimensions (bench/transformers_peer.py), if
#      torch and transformers are installed.
# Steps can be skipped: OPS=0 MODEL=0 PROFILE=0 PEER=0. Usage: scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
B=${BUILD:-build-gpu}
CONTEXT=${CONTEXT:-4096}
PREFILL=${PREFILL:-4096}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_TEST_PYTHON=python3 >"$OUT/cmake.log" 2>&1 ||
  { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$B" -j "$(nproc)" --target seekpipe_bench_model bench_ops bench_lt >"$OUT/build.log" 2>&1 ||
  { grep -E "error|Error" "$OUT/build.log" | head -30; exit 1; }
echo "build ok ($SECONDS s)"
flash=(--model tests/data/configs/deepseek-v4-flash --load-format dummy --device cuda
       --override-config '{"num_hidden_layers": 4}')
if [ "${OPS:-1}" = 1 ]; then
  timeout 300 "$B/bench/ops/bench_ops" >"$OUT/bench_ops.log" 2>&1
  echo "bench_ops exit $? ($SECONDS s)"; cat "$OUT/bench_ops.log"
  timeout 200 "$B/bench/ops/bench_lt" >"$OUT/bench_lt.log" 2>&1
  echo "bench_lt exit $? ($SECONDS s)"; cat "$OUT/bench_lt.log"
fi
if [ "${MODEL:-1}" = 1 ]; then
  timeout 500 "$B/seekpipe_bench_model" "${flash[@]}" --batch "${BATCHES:-1,8,32,64}" \
    --context "$CONTEXT" --prefill "$PREFILL" --decode-steps 16 >"$OUT/model.log" 2>&1
  echo "model bench exit $? ($SECONDS s)"; cat "$OUT/model.log"
fi
if [ "${PROFILE:-1}" = 1 ] && command -v ncu >/dev/null; then
  timeout 400 ncu --csv --profile-from-start off --metrics gpu__time_duration.sum \
    "$B/seekpipe_bench_model" "${flash[@]}" --batch 1 --context "$CONTEXT" --prefill "$PREFILL" \
    --decode-steps 4 --profile-step 2 --enforce-eager >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
  echo "ncu exit $? ($SECONDS s)"
  python3 bench/kernel_profile.py "$OUT/ncu.csv" | tee "$OUT/kernels.md" | head -60
  # The first prefill step (PREFILL tokens of one sequence), per kernel.
  timeout 400 ncu --csv --profile-from-start off --metrics gpu__time_duration.sum \
    "$B/seekpipe_bench_model" "${flash[@]}" --batch 1 --context "$PREFILL" --prefill "$PREFILL" \
    --decode-steps 1 --profile-prefill --enforce-eager >"$OUT/ncu_prefill.csv" 2>"$OUT/ncu_prefill.err"
  echo "ncu prefill exit $? ($SECONDS s)"
  python3 bench/kernel_profile.py "$OUT/ncu_prefill.csv" | tee "$OUT/kernels_prefill.md" | head -40
fi
if [ "${PEER:-1}" = 1 ] && python3 -c "import torch, transformers" 2>/dev/null; then
  timeout 500 python3 bench/transformers_peer.py tests/data/configs/deepseek-v4-flash --layers 4 \
    --batch 1,32 --context "$CONTEXT" --decode-steps 8 >"$OUT/peer.log" 2>&1
  echo "transformers peer exit $? ($SECONDS s)"; cat "$OUT/peer.log"
fi
