#!/usr/bin/env bash
# The watchdog (--stage-timeout): a stage that stops without dying (SIGSTOP, as a hung GPU, a stuck
# driver call or a swapping host looks) brings every stage down within the timeout, exit 5, naming
# the stalled stage; nothing is left running. A run longer than the timeout is not stopped.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
T=3  # the timeout the tests use (default 300 s)
model=$data/configs/flash-mini
tag="--seed 5151"  # marks this test's processes (pgrep)
gen=(generate --device cpu --model "$model" --load-format dummy $tag --prompt-ids 3,4,5,6 --prompt-ids 7,8
     --max-tokens 3000 --ignore-eos --threads 1 --max-model-len 4096 --stage-timeout $T)
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
expect_stall() { # label stalled-stage rc out
  [ "$3" = 5 ] || fail "$1: exit $3, expected 5: $4"
  grep -q "stage $2 is stalled or unreachable" <<<"$4" || fail "$1: stage $2 not named: $4"
  local n; n=$(grep -c "is stalled or unreachable" <<<"$4")
  [ "$n" -ge 1 ] || fail "$1: no watchdog message"
  grep "is stalled or unreachable" <<<"$4" | grep -vq "stage $2 is stalled" && fail "$1: another stage blamed: $(grep "is stalled" <<<"$4")"
  echo "ok: $1: exit 5, $(grep -o "stage [0-9]* (rank [0-9]*): no message from stage $2[^:]*" <<<"$4" | head -1)"
}

# 1. Threads: stage 1 blocks forever at step 20 (threads cannot be stopped one by one).
t0=$(date +%s%N)
out=$(timeout 60 "$bin" "${gen[@]}" --pp 3 --fault-inject 1:20:stall 2>&1); rc=$?
expect_stall "threads, stage 1 stalls" 1 $rc "$out"; elapsed_ok $t0 $((T + 10)); no_leftovers

# 2. mpirun: stage 1 stops itself (SIGSTOP) at step 20; and the last stage (only stage 0 waits on it).
for s in 1 2; do
  t0=$(date +%s%N)
  out=$(timeout 60 $MPIRUN -np 3 "$bin" "${gen[@]}" --fault-inject $s:20:stall 2>&1); rc=$?
  expect_stall "mpirun, stage $s stops itself" $s $rc "$out"; elapsed_ok $t0 $((T + 10)); no_leftovers
done

# 3. mpirun: kill -STOP on rank 1's process from outside, mid-generation.
log=$(mktemp)
timeout 60 $MPIRUN -np 3 "$bin" "${gen[@]}" >"$log" 2>&1 &
launcher=$!
victim=""
for i in $(seq 1 100); do
  for pid in $(pgrep -f "$pattern"); do
    if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then victim=$pid; fi
  done
  [ -n "$victim" ] && [ "$(grep -c loaded "$log")" = 3 ] && break
  sleep 0.1
done
[ -n "$victim" ] || fail "could not find rank 1"
sleep 1
kill -STOP "$victim"
t1=$(date +%s%N)
wait $launcher; rc=$?
expect_stall "mpirun, rank 1 stopped from outside (kill -STOP)" 1 $rc "$(cat "$log")"; elapsed_ok $t1 $((T + 10)); no_leftovers
rm -f "$log"

# 4. A run longer than the timeout finishes: the watchdog counts progress, not run time.
t0=$(date +%s%N)
short=(generate --device cpu --model "$data/small" --prompt-ids 1,2,3 --max-tokens 2500 --ignore-eos --threads 1)
want=$(hash_of "$("$bin" "${short[@]}")")
for mode in threads mpi; do
  if [ $mode = mpi ]; then
    out=$(timeout 120 $MPIRUN -np 3 "$bin" "${short[@]}" --stage-timeout 1 2>&1)
  else
    out=$(timeout 120 "$bin" "${short[@]}" --pp 3 --stage-timeout 1 2>&1)
  fi
  rc=$?; secs=$(( ($(date +%s%N) - t0) / 1000000 ))
  [ $rc = 0 ] || fail "$mode: a healthy run was stopped: $out"
  [ $secs -gt 2000 ] || fail "$mode: the run took only $secs ms, not longer than the timeout"
  [ "$(hash_of "$out")" = "$want" ] || fail "$mode: logits differ with the watchdog: $out"
  echo "ok: $mode pp 3 --stage-timeout 1: a ${secs} ms run finishes, $(hash_of "$out")"
  t0=$(date +%s%N)
done
