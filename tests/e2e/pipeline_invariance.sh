#!/usr/bin/env bash
# verify --pp N (N = 2, 3 and the number of layers) over threads or mpirun processes: every run
# passes and prints the logits_hash of --pp 1 with the same flags, also with chunked prefill.
# All prompts of the fixture run concurrently (several sequences of different lengths).
. "$(dirname "$0")/lib.sh"
bin=$1 model=$2 mode=$3
L=$(num_layers "$model")
for flags in "" "--max-num-batched-tokens 7"; do
  base=$("$bin" verify --device cpu --model "$model" --golden "$model/golden.safetensors" --threads 1 $flags) || fail "pp 1 $flags: $base"
  want=$(hash_of "$base")
  for pp in 2 3 $L; do
    if [ "$mode" = mpi ]; then
      out=$(timeout 300 $MPIRUN -np $pp "$bin" verify --device cpu --model "$model" --golden "$model/golden.safetensors" --threads 1 $flags 2>&1)
    else
      out=$(timeout 300 "$bin" verify --device cpu --model "$model" --golden "$model/golden.safetensors" --threads 1 --pp $pp $flags 2>&1)
    fi
    rc=$?
    [ $rc = 0 ] || fail "$mode pp $pp $flags exited $rc: $out"
    got=$(hash_of "$out")
    [ "$got" = "$want" ] || fail "$mode pp $pp $flags: $got differs from pp 1's $want"
    [ "$(grep -c 'logits_hash=' <<<"$out")" = 1 ] || fail "$mode pp $pp: logits_hash printed more than once"
    echo "ok: $mode pp $pp $flags $got ($(grep -o 'bubble [0-9.]*%' <<<"$out"))"
  done
done
