#!/usr/bin/env bash
# Builds seekpipe on a GPU machine and runs the GPU checks: the op parity suite (ctest label gpu)
# and `verify --device cuda` on the bundled fixtures and trained models. Logs go to $OUT (default
# gpu-out/). Usage: scripts/gpu_check.sh [gtest filter]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build-gpu}
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_TEST_PYTHON=python3 >"$OUT/cmake.log" 2>&1 ||
  { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" --target seekpipe gpu_tests >"$OUT/build.log" 2>&1 ||
  { grep -E "error|Error" "$OUT/build.log" | head -30; exit 1; }
echo "build ok"
"$BUILD/tests/gpu_tests" --gtest_filter="${1:-*}" >"$OUT/gpu_tests.log" 2>&1
echo "gpu_tests exit $?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|Expected|Which is|rel|CUDA" "$OUT/gpu_tests.log" | head -60
status=0
for m in tests/data/tiny tests/data/small tests/data/tinyq models/kjv-v4-tiny models/kjv-v4-tiny-fp8; do
  [ -d "$m" ] || { echo "skip $m (not in this checkout)"; continue; }
  log="$OUT/verify_$(basename "$m").log"
  timeout 300 "$BUILD/seekpipe" verify --device cuda --model "$m" --golden "$m/golden.safetensors" >"$log" 2>&1
  rc=$?
  echo "verify $m: exit $rc: $(grep -E '^positions|^verify' "$log" | tr '\n' ' ')"
  [ $rc = 0 ] || { status=1; tail -5 "$log"; }
done
exit $status
