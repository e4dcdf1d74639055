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
  timeout 300 "$BUILD/seekpipe" verify --device cuda --model "$m" --golden "$m/golden.safetensors" \
    ${VERIFY_FLAGS:-} >"$log" 2>&1
  rc=$?
  echo "verify $m: exit $rc: $(grep -E '^positions|^verify' "$log" | tr '\n' ' ')"
  [ $rc = 0 ] || { status=1; tail -5 "$log"; }
done
# Full width: V4-Flash's shapes and formats, 4 layers, dummy weights: the CPU backend writes the
# reference (every position's logits), the CUDA backend is checked against it on identical weights.
if [ "${FULL_WIDTH:-1}" = 1 ]; then
  flash=(--model tests/data/configs/deepseek-v4-flash --load-format dummy
         --override-config '{"num_hidden_layers": 4}' --max-model-len 512 --max-num-seqs 4
         --max-num-batched-tokens 512)
  ids() { python3 -c "import random; r=random.Random($1); print(','.join(str(r.randrange(129280)) for _ in range($2)))"; }
  t0=$(date +%s)
  [ -f /tmp/flash4.golden ] || timeout 600 "$BUILD/seekpipe" golden --device cpu "${flash[@]}" --prompt-ids "$(ids 1 1)" \
    --prompt-ids "$(ids 2 17)" --prompt-ids "$(ids 3 150)" --max-tokens 6 --out /tmp/flash4.golden \
    >"$OUT/flash4_cpu.log" 2>&1
  echo "flash4 cpu golden: exit $? ($(( $(date +%s) - t0 )) s)"
  timeout 300 "$BUILD/seekpipe" verify --device cuda "${flash[@]}" --golden /tmp/flash4.golden ${VERIFY_FLAGS:-} \
    >"$OUT/flash4_cuda.log" 2>&1
  rc=$?
  echo "flash4 verify --device cuda: exit $rc: $(grep -E '^positions|^verify' "$OUT/flash4_cuda.log" | tr '\n' ' ')"
  [ $rc = 0 ] || { status=1; tail -5 "$OUT/flash4_cuda.log"; }
fi
# Speculative decoding and prefix caching on the GPU (SPEC=1): the MTP layer against its golden;
# generate with --speculative mtp (K = 1, 3; pp 1 and 2) against the same run without it (the
# tokens agree except where a near-tie flips: CUDA kernels are deterministic per batch shape, and a
# verify step has another shape than a one-token decode); a second prompt sharing a 300-token
# prefix with the first hits the prefix cache and generates what it does without the cache.
if [ "${SPEC:-1}" = 1 ]; then
  for m in tests/data/tiny models/kjv-v4-tiny-fp8; do
    timeout 120 "$BUILD/seekpipe" verify --device cuda --model "$m" --golden "$m/golden.safetensors" \
      --mtp-golden "$m/mtp_golden.safetensors" >"$OUT/mtp_$(basename "$m").log" 2>&1
    echo "verify --mtp-golden $m: exit $?: $(grep -E '^mtp positions|^mtp verify' "$OUT/mtp_$(basename "$m").log" | tr '\n' ' ')"
  done
  m=models/kjv-v4-tiny-fp8
  gen=(generate --device cuda --model "$m" --prompt-ids 0,9,100,200,300,400,500,600,700
       --prompt-ids 0,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20 --prompt-ids 0,42,79,260,2175
       --max-tokens 64 --ignore-eos)
  timeout 120 "$BUILD/seekpipe" "${gen[@]}" >"$OUT/spec_base.log" 2>&1
  echo "generate (no speculation): exit $?"
  for k in 1 3; do
    for pp in 1 2; do
      log="$OUT/spec_k${k}_pp${pp}.log"
      timeout 120 "$BUILD/seekpipe" "${gen[@]}" --speculative mtp --num-speculative-tokens $k --pp $pp >"$log" 2>&1
      rc=$?
      same=$(python3 - "$OUT/spec_base.log" "$log" <<'PY'
import sys
def ids(p):
    return [l.split(":", 1)[1].split("(")[0].split() for l in open(p) if "output ids" in l]
a, b = ids(sys.argv[1]), ids(sys.argv[2])
n = sum(len(x) for x in a)
same = sum(1 for x, y in zip(a, b) for i in range(min(len(x), len(y))) if x[:i + 1] == y[:i + 1])
print("%d of %d tokens equal to the run without speculation (common prefix per prompt)" % (same, n))
PY
)
      echo "spec k $k pp $pp: exit $rc: $same; $(grep -E '^speculative|^boundary' "$log" | tr '\n' ' ')"
    done
  done
  long=$(python3 -c "import random; r=random.Random(5); print(','.join(str(r.randrange(2, 4000)) for _ in range(300)))")
  for cache in --enable-prefix-caching --no-enable-prefix-caching; do
    timeout 120 "$BUILD/seekpipe" generate --device cuda --model "$m" --max-num-seqs 1 --max-tokens 16 \
      --ignore-eos --prompt-ids "$long,11,12" --prompt-ids "$long,13,14,15" $cache >"$OUT/prefix$cache.log" 2>&1
    echo "prefix $cache: exit $?: $(grep -E 'prefix cache|output ids' "$OUT/prefix$cache.log" | tr '\n' ' ')"
  done
fi
# Quality: teacher-forced held-out loss, CPU vs GPU, on both trained models.
for m in models/kjv-v4-tiny models/kjv-v4-tiny-fp8; do
  [ -d "$m" ] && [ "${SCORE:-1}" = 1 ] || continue
  for d in cpu cuda; do
    timeout 300 "$BUILD/seekpipe" score --device $d --model "$m" --data models/kjv_val_public.jsonl \
      >"$OUT/score_$(basename "$m")_$d.log" 2>&1
    echo "score $m $d: exit $?: $(grep -E 'loss' "$OUT/score_$(basename "$m")_$d.log" | head -2 | tr '\n' ' ')"
  done
done
exit $status
