#!/usr/bin/env bash
# Builds seekpipe on a GPU machine and runs the GPU pipeline checks of tests/e2e/gpu_pipeline.sh:
# verify --device cuda on tests/data/{tiny,small,tinyq} and models/kjv-v4-tiny-fp8 at pp 1, 2 and
# min(4, layers) over threads and mpirun with the NCCL stage transport, one prompt's logits_hash at
# every split, and the failure cases (a rank killed, an injected CUDA error, an NCCL peer gone).
# Logs go to $OUT (default gpu-out/). NCCL_NVLS_ENABLE=0 unless set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build-gpu}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m >"$OUT/topo.txt" 2>&1
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_TEST_PYTHON=python3 >"$OUT/cmake.log" 2>&1 ||
  { tail -30 "$OUT/cmake.log"; exit 1; }
grep -E "NCCL" "$OUT/cmake.log"
cmake --build "$BUILD" -j "$(nproc)" --target seekpipe >"$OUT/build.log" 2>&1 ||
  { grep -E "error|Error" "$OUT/build.log" | head -30; exit 1; }
echo "build ok"
bash tests/e2e/gpu_pipeline.sh "$BUILD/seekpipe" tests/data models "$OUT" 2>&1 | tee "$OUT/gpu_pipeline.txt"
exit "${PIPESTATUS[0]}"
