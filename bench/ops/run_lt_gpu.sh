#!/usr/bin/env bash
# On a GPU machine: builds gpu_tests, seekpipe and bench_lt; runs the fp8 projection parity tests
# (and the exact projections' as a regression check), `verify --device cuda --activation-quant fp8`
# on the fixtures and the trained FP8 model, and the benchmark; logs under $OUT (default gpu-out/).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
B=${BUILD:-/tmp/b}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_TEST_PYTHON=python3 >/tmp/lt_cmake.log 2>&1 ||
  { tail -30 /tmp/lt_cmake.log; exit 1; }
cmake --build "$B" -j16 --target gpu_tests bench_lt seekpipe >/tmp/lt_build.log 2>&1 ||
  { grep -E "error|Error" /tmp/lt_build.log | head -30; exit 1; }
echo "build ok ($SECONDS s)"
timeout ${TEST_TIMEOUT:-80} "$B/tests/gpu_tests" --gtest_filter="Fp8*" >"$OUT/gpu_tests_fp8.log" 2>&1
echo "gpu_tests Fp8* exit $? ($SECONDS s)"
grep -E "^\[  (FAILED|PASSED|SKIPPED|     OK) |Failure|Expected|Which is|CUDA error|cuBLASLt|  (quant|lt|M=)" "$OUT/gpu_tests_fp8.log" | head -70
if [ "${ALL_TESTS:-1}" = 1 ]; then
  timeout ${ALL_TIMEOUT:-100} "$B/tests/gpu_tests" --gtest_filter="-Fp8*" >"$OUT/gpu_tests_rest.log" 2>&1
  echo "gpu_tests (the rest) exit $? ($SECONDS s)"
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|CUDA error" "$OUT/gpu_tests_rest.log" | head -20
fi
for m in tests/data/tiny tests/data/small tests/data/tinyq models/kjv-v4-tiny-fp8; do
  log="/tmp/verify_$(basename "$m").log"
  timeout 60 "$B/seekpipe" verify --device cuda --model "$m" --golden "$m/golden.safetensors" \
    --activation-quant fp8 ${VERIFY_FLAGS:-} >"$log" 2>&1
  rc=$?
  echo "verify fp8 $m: exit $rc: $(grep -E '^positions|^verify|activation-quant' "$log" | tr '\n' ' ')"
  [ $rc = 0 ] || tail -3 "$log"
done
m=models/kjv-v4-tiny-fp8
timeout 60 "$B/seekpipe" verify --device cuda --model $m --golden $m/golden.safetensors \
  --activation-quant fp8 --activation-dtype bf16 >/tmp/verify_fp8_bf16.log 2>&1
echo "verify fp8 + bf16 activations $m: exit $?: $(grep -E '^positions|^verify|activation-quant' /tmp/verify_fp8_bf16.log | tr '\n' ' ')"
timeout 60 bash tests/e2e/cli_errors.sh "$B/seekpipe" tests/data >/tmp/cli_errors.log 2>&1
echo "e2e cli_errors exit $? ($SECONDS s)"
tail -2 /tmp/cli_errors.log
timeout ${BENCH_TIMEOUT:-70} "$B/bench/ops/bench_lt" >"$OUT/bench_lt.log" 2>&1
echo "bench_lt exit $? ($SECONDS s)"
cat "$OUT/bench_lt.log"
