#!/usr/bin/env bash
# On a GPU machine: builds gpu_tests and bench_ops, runs the projection/MoE parity tests and the
# benchmark; logs under $OUT (default gpu-out/).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
B=${BUILD:-/tmp/b}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_BUILD_TESTS=ON >"$OUT/cmake.log" 2>&1 ||
  { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$B" -j16 --target gpu_tests bench_ops >"$OUT/build.log" 2>&1 ||
  { grep -E "error|Error" "$OUT/build.log" | head -30; exit 1; }
echo "build ok ($SECONDS s)"
timeout ${TEST_TIMEOUT:-150} "$B/tests/gpu_tests" --gtest_filter="${FILTER:-*Gemm*:*Moe*:*Linear*:*Embed*}" >"$OUT/gpu_tests.log" 2>&1
echo "gpu_tests exit $? ($SECONDS s)"
grep -E "^\[  (FAILED|PASSED|SKIPPED|     OK) |Failure|Expected|Which is|CUDA error" "$OUT/gpu_tests.log" | head -40
timeout ${BENCH_TIMEOUT:-90} "$B/bench/ops/bench_ops" >"$OUT/bench.log" 2>&1
echo "bench_ops exit $? ($SECONDS s)"
cat "$OUT/bench.log"
