#!/usr/bin/env bash
# The watchdog over loading (--stage-timeout): a stage that stops while it loads its weights (a
# stalled file system: its load thread never returns; a stopped process: SIGSTOP) brings every
# stage down within the timeout, exit 5, naming it; nothing is left running. A load longer than
# the timeout that keeps making progress is not stopped.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
T=3  # the timeout the tests use (default 300 s)
model=$data/configs/flash-mini
tag="--seed 5252"  # marks this test's processes (pgrep)
# Wider experts so that a stage's dummy weights take a few seconds to generate (a load to stop in
# the middle of): 8 layers x 256 experts x 3 x 1024 x 1024, FP4.
big='{"hidden_size": 1024, "moe_intermediate_size": 1024, "n_routed_experts": 256}'
gen=(generate --device cpu --model "$model" --load-format dummy $tag --prompt-ids 3,4,5,6
     --max-tokens 4 --ignore-eos --threads 1 --max-num-seqs 2 --max-model-len 256)
pattern="seekpipe generate --device cpu --model $model --load-format dummy $tag"
cleanup() { # stopped ranks first get SIGCONT so SIGKILL lands; only this test's processes
  for pid in $(pgrep -f "$pattern"); do kill -CONT $pid 2>/dev/null; kill -9 $pid 2>/dev/null; done
}
trap cleanup EXIT
elapsed_ok() { # start_ns limit_s
  local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
  [ $ms -lt $(( $2 * 1000 )) ] || fail "took ${ms} ms (limit $2 s)"
  echo "   (${ms} ms)"
}
no_leftovers() {
  for i in $(seq 1 50); do
    pgrep -f "$pattern" >/dev/null || return 0
    sleep 0.1
  done
  fail "processes left running 5 s after the run ended: $(pgrep -fa "$pattern")"
}
expect_stall() { # label stage rc out regex
  [ "$3" = 5 ] || fail "$1: exit $3, expected 5: $4"
  grep -Eq "$5" <<<"$4" || fail "$1: stage $2 not named as expected ('$5'): $4"
  grep "is stalled" <<<"$4" | grep -vq "stage $2 is stalled" && fail "$1: another stage blamed: $(grep "is stalled" <<<"$4")"
  grep -q "logits_hash=" <<<"$4" && fail "$1: printed results: $4"
  echo "ok: $1: exit 5, $(grep -Eo "$5" <<<"$4" | head -1)"
}

# 1. Threads: stage 1's load thread never returns (as a read from a stalled file system): the stage
#    itself sees its load make no progress and stops the run, naming itself.
t0=$(date +%s%N)
out=$(timeout 60 "$bin" "${gen[@]}" --pp 3 --stage-timeout $T --fault-inject 1:load:stall 2>&1); rc=$?
expect_stall "threads, stage 1's load stalls" 1 $rc "$out" \
  "stage 1 \(rank 1\): its loading made no progress for [0-9.]+ s \(--stage-timeout $T\): stage 1 is stalled while loading"
elapsed_ok $t0 $((T + 10)); no_leftovers

# 2. mpirun: rank 1 stops itself (SIGSTOP) in the middle of its load; rank 2 the same (the last
#    stage). Every other rank, loaded or still loading, hears nothing from it.
for s in 1 2; do
  t0=$(date +%s%N)
  out=$(timeout 60 $MPIRUN -np 3 "$bin" "${gen[@]}" --stage-timeout $T --fault-inject $s:load:stall 2>&1); rc=$?
  expect_stall "mpirun, rank $s stops itself while loading" $s $rc "$out" \
    "stage [0-9] \(rank [0-9]\): nothing from stage $s for $T s while it loads \(--stage-timeout $T\): stage $s is stalled or unreachable"
  elapsed_ok $t0 $((T + 10)); no_leftovers
done

# 3. mpirun: kill -STOP on rank 1 from outside once it has started loading its (larger) share.
log=$(mktemp)
timeout 60 $MPIRUN -np 3 "$bin" "${gen[@]}" --override-config "$big" --pp-partition 1,6,1 \
  --stage-timeout $T >"$log" 2>&1 &
launcher=$!
victim=""
for i in $(seq 1 300); do
  for pid in $(pgrep -f "$pattern"); do
    if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then victim=$pid; fi
  done
  [ -n "$victim" ] && grep -q "^stage 1: loading weights" "$log" && break
  sleep 0.05
done
[ -n "$victim" ] || fail "could not find rank 1: $(cat "$log")"
grep -q "^stage 1: loading weights" "$log" || fail "rank 1 never reported loading: $(cat "$log")"
kill -STOP "$victim"
t1=$(date +%s%N)
wait $launcher; rc=$?
grep -q "stage 1/3 .*loaded" "$log" && fail "rank 1 finished loading before it was stopped: $(cat "$log")"
expect_stall "mpirun, rank 1 stopped from outside while loading (kill -STOP)" 1 $rc "$(cat "$log")" \
  "nothing from stage 1 for $T s while it loads \(--stage-timeout $T\): stage 1 is stalled or unreachable"
elapsed_ok $t1 $((T + 10)); no_leftovers
rm -f "$log"

# 4. A load longer than the timeout finishes: the watchdog counts progress (a tick per tensor and
#    per layer uploaded), not load time; threads and mpirun. 
for mode in threads mpi; do
  t0=$(date +%s%N)
  if [ $mode = mpi ]; then
    out=$(timeout 120 $MPIRUN -np 3 "$bin" "${gen[@]}" --override-config "$big" --pp-partition 1,6,1 --stage-timeout $T 2>&1)
  else
    out=$(timeout 120 "$bin" "${gen[@]}" --override-config "$big" --pp 3 --pp-partition 1,6,1 --stage-timeout $T 2>&1)
  fi
  rc=$?
  [ $rc = 0 ] || fail "$mode: a healthy load was stopped: $out"
  secs=$(grep -o "stage 1/3 .* in [0-9.]* s" <<<"$out" | grep -o "[0-9.]* s$" | tr -d ' s')
  [ -n "$secs" ] || fail "$mode: no load time for stage 1: $out"
  awk -v s="$secs" -v t=$T 'BEGIN { exit !(s > t) }' || fail "$mode: stage 1 loaded in only $secs s, not longer than the timeout"
  echo "ok: $mode pp 3 --stage-timeout $T: stage 1 loads for $secs s and the run finishes, $(hash_of "$out")"
done
