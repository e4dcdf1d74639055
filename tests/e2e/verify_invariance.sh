#!/usr/bin/env bash
# verify under several chunkings, batch shapes and thread counts: every run must pass the golden
# tolerance and print the logits_hash of the default run (the CPU ops are batch-invariant).
. "$(dirname "$0")/lib.sh"
bin=$1 model=$2
run() { "$bin" verify --device cpu --model "$model" --golden "$model/golden.safetensors" --atol 5e-5 "$@"; }
base=$(run --threads 2) || fail "default verify failed: $base"
want=$(hash_of "$base")
for flags in "--max-num-batched-tokens 1" "--max-num-batched-tokens 3" "--max-num-batched-tokens 13" \
             "--max-num-batched-tokens 100" "--max-num-seqs 1" "--max-num-seqs 1 --threads 1" "--threads 1"; do
  out=$(run $flags) || fail "verify $flags failed: $out"
  got=$(hash_of "$out")
  [ "$got" = "$want" ] || fail "verify $flags: $got differs from $want"
  echo "ok: $flags $got"
done
