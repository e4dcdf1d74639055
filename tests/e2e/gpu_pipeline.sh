#!/usr/bin/env bash
# GPU pipeline (ctest label gpu; skipped, exit 77, with fewer than 2 GPUs):
#  * verify --device cuda on the fixtures and the FP8 demo model at pp 1, 2 and min(4, layers, GPUs),
#    over threads and mpirun, with the boundary tensor over NCCL (the default between GPU stages):
#    every split passes, and no byte of the boundary goes through host memory;
#  * one prompt alone (--micro-batches 1: the same batch shapes at every split) gives the same
#    logits_hash at every split and launcher;
#  * failures: a rank killed at a random step, an injected CUDA error, an NCCL peer gone (its sends
#    stop while its host messages go on): every rank exits non-zero within 10 s of the fault, the
#    stage named.
# Usage: gpu_pipeline.sh BIN TEST_DATA [MODELS_DIR [OUT_DIR]]; logs go to OUT_DIR.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2 models=${3:-} out=${4:-$(mktemp -d)}
mkdir -p "$out"
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${ngpu:-0}" -ge 2 ] || { echo "skip: needs 2 GPUs, ${ngpu:-0} visible"; exit 77; }
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
status=0
bad() { echo "FAIL: $*"; status=1; [ "${FAIL_FAST:-0}" = 1 ] && exit 1; }
# Every run is bounded: a hang is a failure, never a stuck test.
limit=${RUN_TIMEOUT:-120}

dirs=("$data/tiny" "$data/small" "$data/tinyq")
[ -n "$models" ] && [ -d "$models/kjv-v4-tiny-fp8" ] && dirs+=("$models/kjv-v4-tiny-fp8")
# ONLY="tiny kjv-v4-tiny-fp8": a subset of the models (a short run on a scarce machine).
if [ -n "${ONLY:-}" ]; then
  keep=(); for m in "${dirs[@]}"; do [[ " $ONLY " == *" $(basename "$m") "* ]] && keep+=("$m"); done
  dirs=("${keep[@]}")
fi
skip_rest=0  # the first NCCL run failing: the rest of the matrix would fail the same way
for m in "${dirs[@]}"; do
  [ $skip_rest = 1 ] && { echo "skip $m: an earlier NCCL run failed"; continue; }
  name=$(basename "$m")
  L=$(num_layers "$m")
  top=$(( L < 4 ? L : 4 )); top=$(( top < ngpu ? top : ngpu ))
  splits=$(printf "%s\n" 1 2 "$top" | sort -nu | tr '\n' ' ')
  ref=""
  ids=$(python3 -c "import random; r=random.Random(7); print(','.join(str(r.randrange(200)) for _ in range(21)))")
  for pp in $splits; do
    for launch in threads mpirun; do
      [ "$pp" = 1 ] && [ "$launch" = mpirun ] && continue
      if [ "$launch" = threads ]; then run=("$bin"); ppf=(--pp "$pp"); else run=($MPIRUN -np "$pp" "$bin"); ppf=(); fi
      log="$out/verify_${name}_pp${pp}_${launch}.log"
      timeout "$limit" "${run[@]}" verify --device cuda --model "$m" --golden "$m/golden.safetensors" "${ppf[@]}" \
        --stage-timeout ${STAGE_TIMEOUT:-15} >"$log" 2>&1
      rc=$?
      summary="$(grep -E '^positions|^boundary' "$log" | tr '\n' ' ')"
      echo "verify $name pp $pp $launch: exit $rc: $summary"
      [ $rc = 0 ] || { tail -15 "$log"; bad "verify $name pp $pp $launch"; [ "$pp" -gt 1 ] && skip_rest=1; }
      if [ "$pp" -gt 1 ]; then
        grep -Eq "^boundary: [1-9][0-9]* bytes device to device \(nccl\), 0 bytes through host memory" "$log" ||
          bad "verify $name pp $pp $launch: the boundary did not go device to device only"
      fi
      # One prompt alone: the same bits at every split.
      log="$out/generate_${name}_pp${pp}_${launch}.log"
      timeout "$limit" "${run[@]}" generate --device cuda --model "$m" --prompt-ids "$ids" --max-tokens 12 \
        --micro-batches 1 --stage-timeout ${STAGE_TIMEOUT:-15} "${ppf[@]}" >"$log" 2>&1 || bad "generate $name pp $pp $launch: exit $?"
      h=$(hash_of "$(cat "$log")")
      echo "  one prompt: $h"
      if [ -z "$ref" ]; then ref=$h; elif [ "$h" != "$ref" ]; then bad "$name pp $pp $launch: $h, pp 1 had $ref"; fi
    done
  done
done

# Failures. A model on which a long generation runs while the fault lands.
m=$data/small
gen=(generate --device cuda --model "$m" --prompt-ids 3,4,5,6 --prompt-ids 7,8 --max-tokens 4000
     --ignore-eos --max-model-len 4096)
# timed LOG cmd...: runs cmd with every output line time-stamped (ns) into LOG; prints the exit code.
timed() {
  local log=$1; shift
  { "$@" 2>&1; echo "exit=$?"; } | while IFS= read -r line; do echo "$(date +%s%N) $line"; done >"$log"
  grep -o 'exit=[0-9]*' "$log" | tail -1 | cut -d= -f2
}
# within LOG REGEX LIMIT_S: from the first line matching REGEX to the last line (the exit).
within() {
  local t0 t1
  t0=$(grep -E -m1 -- "$2" "$1" | cut -d' ' -f1); t1=$(tail -1 "$1" | cut -d' ' -f1)
  [ -n "$t0" ] || { bad "$1: no line matching '$2'"; return; }
  local ms=$(( (t1 - t0) / 1000000 ))
  echo "  ${ms} ms from the fault to the end"
  [ $ms -lt $(( $3 * 1000 )) ] || bad "$1: took ${ms} ms (limit $3 s)"
}
fault_case() { # NAME EXPECT_REGEX FAULT_REGEX cmd...
  local name=$1 expect=$2 at=$3; shift 3
  local log="$out/fault_${name}.log" rc
  rc=$(timed "$log" timeout 40 "$@")
  echo "fault $name: exit $rc: $(grep -E 'error:' "$log" | head -2 | cut -d' ' -f2- | tr '\n' ' ')"
  { [ "$rc" != 0 ] && [ "$rc" != 124 ]; } || bad "fault $name: exit $rc"
  grep -Eq -- "$expect" "$log" || bad "fault $name: expected '$expect'"
  within "$log" "$at" 10
}
step=$(( 20 + RANDOM % 200 ))
echo "fault step: $step"
# A rank killed (SIGKILL) at a random step, mpirun.
fault_case kill_mpi "rank 1 .*(signal 9|Killed)" "loaded" \
  $MPIRUN -np 2 "$bin" "${gen[@]}" --fault-inject "1:$step:kill"
# An injected CUDA error (an invalid memory access on the stage's GPU).
fault_case cuda_threads "stage 1.*CUDA error on GPU 1" "injected CUDA fault" \
  "$bin" "${gen[@]}" --pp 2 --fault-inject "1:$step:cuda"
fault_case cuda_mpi "stage 1.*CUDA error on GPU 1" "injected CUDA fault" \
  $MPIRUN -np 2 "$bin" "${gen[@]}" --fault-inject "1:$step:cuda"
# An NCCL peer gone: stage 0 stops sending on its link; stage 1 names it within --stage-timeout.
fault_case nccl_threads "stage 1 .*NCCL receive .* from stage 0 did not complete .*stage 0 or its GPU or NCCL link is stalled or gone" \
  "injected NCCL fault" "$bin" "${gen[@]}" --pp 2 --fault-inject "0:$step:nccl" --stage-timeout 5
fault_case nccl_mpi "stage 1 .*NCCL receive .* from stage 0 did not complete .*stage 0 or its GPU or NCCL link is stalled or gone" \
  "injected NCCL fault" $MPIRUN -np 2 "$bin" "${gen[@]}" --fault-inject "0:$step:nccl" --stage-timeout 5
[ $status = 0 ] && echo "all GPU pipeline checks passed"
exit $status
