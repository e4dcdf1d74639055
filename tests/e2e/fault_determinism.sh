#!/usr/bin/env bash
# Stage 0 applies sampled tokens only when it must wait, so the steps of a pipelined run (their
# number, ids and contents) are the same in every run: --fault-inject S:STEP near the end of a
# run is reproducible. 5 runs each over threads and mpirun: the same step count; a fault at the
# last step fires every time, one past it never.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
# verify runs every prompt of the golden file concurrently (the old polling gave 42 or 44 steps).
gen=(verify --device cpu --model "$data/small" --golden "$data/small/golden.safetensors" --threads 1)
run() { # mode args...
  local mode=$1; shift
  if [ "$mode" = mpi ]; then timeout 120 $MPIRUN -np 3 "$bin" "${gen[@]}" "$@" 2>&1
  else timeout 120 "$bin" "${gen[@]}" --pp 3 "$@" 2>&1; fi
}
for mode in threads mpi; do
  counts=""
  for i in 1 2 3 4 5; do
    out=$(run $mode) || fail "$mode run $i: $out"
    counts+=" $(grep -o '^[0-9]* steps' <<<"$out" | grep -o '[0-9]*')"
  done
  n=$(tr ' ' '\n' <<<"$counts" | grep . | sort -u)
  [ "$(wc -l <<<"$n")" = 1 ] || fail "$mode: step counts differ over 5 runs:$counts"
  last=$((n - 1))
  for i in 1 2 3 4 5; do
    out=$(run $mode --fault-inject 2:$last:error); rc=$?
    [ $rc = 3 ] && grep -q "stage 2 (rank 2) failed: injected fault at step $last" <<<"$out" ||
      fail "$mode run $i: the fault at step $last (the last) did not fire: exit $rc: $out"
  done
  out=$(run $mode --fault-inject 2:$n:error) || fail "$mode: a fault past the last step fired: $out"
  echo "ok: $mode pp 3: $n steps in each of 5 runs; a fault at step $last fires in 5 of 5 runs, at step $n never"
done
