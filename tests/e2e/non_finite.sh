#!/usr/bin/env bash
# A forward pass that produces NaN or Inf is an error naming where it first appears (layer and
# stage), exit 4, never a silently sampled token 0. Checkpoints: the tiny fixture with one weight
# made NaN (in layer 2) or Inf (the head), in a temporary directory.
# With a third argument `cuda`: the same on the CUDA backend (its per-layer device flag), exit 77
# (skipped) without a GPU; the pipelines need a GPU per stage (3), else only pp 1 runs.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2 device=${3:-cpu}
gpus=0
if [ "$device" = cuda ]; then
  out=$("$bin" generate --device cuda --model "$data/tiny" --prompt-ids 1,2,3 --max-tokens 1 2>&1) || {
    echo "skipped: no CUDA GPU or no CUDA backend: $out"; exit 77; }
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
poison() { # out-dir tensor value(nan|inf)
  mkdir -p "$1" && cp "$data/tiny/config.json" "$1/" &&
  python3 - "$data/tiny/model.safetensors" "$1/model.safetensors" "$2" "$3" <<'PY' || fail "could not write $1"
import json, struct, sys
src, dst, name, value = sys.argv[1:]
b = bytearray(open(src, "rb").read())
n = struct.unpack("<Q", b[:8])[0]
t = json.loads(b[8:8 + n])[name]
size = {"F32": 4, "BF16": 2}[t["dtype"]]
off = 8 + n + t["data_offsets"][0] + size * 5  # element 5
bits = struct.pack("<f", float(value))
b[off:off + size] = bits if size == 4 else bits[2:]  # bf16: the high half of the f32
open(dst, "wb").write(b)
PY
}
# On cuda the NaN goes into layer 2's attention output projection instead: a NaN entering the MoE
# does not reach the residual there (the SwiGLU clamp's fminf / fmaxf return the limit for a NaN,
# where the CPU backend's std::min / std::clamp pass it on), so that layer's output stays finite.
if [ "$device" = cuda ]; then
  poison "$dir/nan" layers.2.attn.wo_b.weight nan
else
  poison "$dir/nan" layers.2.ffn_norm.weight nan
fi
poison "$dir/inf" head.weight inf
run() { # label model expected-stage expected-where -- seekpipe args
  local label=$1 model=$2 stage=$3 where=$4; shift 5
  local out rc
  out=$(timeout 120 "$@" --device $device --model "$model" --prompt-ids 1,2,3 --max-tokens 4 --threads 1 2>&1); rc=$?
  [ $rc = 4 ] || fail "$label: exit $rc, expected 4: $out"
  grep -q "stage $stage (rank $stage): non-finite values (NaN or Inf) first appear in $where.* at step [0-9]" <<<"$out" ||
    fail "$label: stage $stage / $where not named: $out"
  grep -q "logits_hash=" <<<"$out" && fail "$label: printed results: $out"
  echo "ok: $label: exit 4, $(grep -o "stage $stage (rank $stage): non-finite[^:]*" <<<"$out" | head -1)"
}
# vLLM's split of 5 layers: pp 3 -> 2,2,1 (layer 2 on stage 1).
run "$device: NaN weight in layer 2, pp 1" "$dir/nan" 0 "layer 2" -- "$bin" generate
if [ "$device" = cpu ] || [ "$gpus" -ge 3 ]; then
  run "$device: NaN weight in layer 2, threads pp 3" "$dir/nan" 1 "layer 2" -- "$bin" generate --pp 3
  run "$device: NaN weight in layer 2, mpirun -np 3" "$dir/nan" 1 "layer 2" -- $MPIRUN -np 3 "$bin" generate
  run "$device: Inf in the head, threads pp 3" "$dir/inf" 2 "the head (logits)" -- "$bin" generate --pp 3
else
  echo "note: $gpus GPU(s): the pp 3 cases need 3"
fi
run "$device: Inf in the head, pp 1" "$dir/inf" 0 "the head (logits)" -- "$bin" generate
# With speculative decoding the MTP layer runs after the head on the last stage: the target's
# NaN is still named where it first appears, not in the draft layer.
run "$device: NaN weight in layer 2, speculative" "$dir/nan" 0 "layer 2" -- "$bin" generate --speculative mtp --num-speculative-tokens 2
run "$device: Inf in the head, speculative" "$dir/inf" 0 "the head (logits)" -- "$bin" generate --speculative mtp
# The unpoisoned checkpoint still runs.
"$bin" generate --device $device --model "$data/tiny" --prompt-ids 1,2,3 --max-tokens 4 --threads 1 >/dev/null || fail "clean tiny"
echo "ok: the clean checkpoint runs"
