#!/usr/bin/env bash
# A failing stage brings the whole pipeline down promptly, naming the stage; nothing hangs.
# Ranks started with a different partition are refused.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
# A dummy model big enough that generating 3000 tokens takes far longer than the kill takes to land.
model=$data/configs/flash-mini
gen=(generate --device cpu --model "$model" --load-format dummy --prompt-ids 3,4,5,6 --prompt-ids 7,8 --max-tokens 3000 --ignore-eos
     --threads 1 --max-model-len 4096)
elapsed_ok() { # start_ns limit_s
  local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
  [ $ms -lt $(( $2 * 1000 )) ] || fail "took ${ms} ms (limit $2 s)"
  echo "   (${ms} ms)"
}
no_leftovers() { # ranks may take a moment to be reaped after mpirun returns; 5 s catches strays
  for i in $(seq 1 50); do
    pgrep -f "seekpipe generate --device cpu --model $model" >/dev/null || return 0
    sleep 0.1
  done
  pkill -9 -f "seekpipe generate --device cpu --model $model"; fail "ranks left running 5 s after mpirun returned"
}

# 1. Threads: a stage fails mid-generation.
t0=$(date +%s%N)
out=$(timeout 20 "$bin" "${gen[@]}" --pp 3 --fault-inject 1:20 2>&1); rc=$?
[ $rc != 0 ] && [ $rc != 124 ] || fail "threads fault: exit $rc"
grep -q "stage 1 (rank 1) failed: injected fault at step 20" <<<"$out" || fail "threads fault: stage not named: $out"
echo "ok: threads pipeline, stage 1 fails: exit $rc"; elapsed_ok $t0 10

# 2. MPI: a stage process dies (SIGKILL) mid-generation.
t0=$(date +%s%N)
out=$(timeout 20 $MPIRUN -np 3 "$bin" "${gen[@]}" --fault-inject 1:20:kill 2>&1); rc=$?
[ $rc != 0 ] && [ $rc != 124 ] || fail "mpi kill: exit $rc"
grep -Eq "rank 1 .*(signal 9|Killed)" <<<"$out" || fail "mpi kill: rank 1 not named: $out"
echo "ok: mpirun, stage 1 process killed: exit $rc"; elapsed_ok $t0 10; no_leftovers

# 3. MPI: a stage reports an error and aborts the job.
t0=$(date +%s%N)
out=$(timeout 20 $MPIRUN -np 3 "$bin" "${gen[@]}" --fault-inject 2:20:error 2>&1); rc=$?
[ $rc != 0 ] && [ $rc != 124 ] || fail "mpi error: exit $rc"
grep -q "stage 2 (rank 2) failed: injected fault at step 20" <<<"$out" || fail "mpi error: stage not named: $out"
echo "ok: mpirun, stage 2 errors: exit $rc"; elapsed_ok $t0 10; no_leftovers

# 4. MPI: kill -9 one stage's process from outside, mid-generation.
log=$(mktemp)
t0=$(date +%s%N)
timeout 60 $MPIRUN -np 3 "$bin" "${gen[@]}" >"$log" 2>&1 &
launcher=$!
victim=""
for i in $(seq 1 100); do
  for pid in $(pgrep -f "seekpipe generate --device cpu --model $model"); do
    if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then victim=$pid; fi
  done
  [ -n "$victim" ] && grep -q "loaded" "$log" && break
  sleep 0.1
done
[ -n "$victim" ] || { kill -9 $launcher; fail "could not find rank 1"; }
sleep 0.5
kill -9 "$victim"
t1=$(date +%s%N)
wait $launcher; rc=$?
[ $rc != 0 ] && [ $rc != 124 ] || fail "external kill: exit $rc"
grep -Eq "rank 1 .*(signal 9|Killed)" "$log" || fail "external kill: rank 1 not named: $(cat "$log")"
echo "ok: mpirun, rank 1 killed from outside: exit $rc"; elapsed_ok $t1 10; no_leftovers
rm -f "$log"

# 5. Mismatched partitions are refused at start-up.
model=$data/tiny
out=$(timeout 30 $MPIRUN -np 1 "$bin" generate --device cpu --model "$model" --prompt-ids 1,2 --pp-partition 2,3 : \
      -np 1 "$bin" generate --device cpu --model "$model" --prompt-ids 1,2 --pp-partition 3,2 2>&1); rc=$?
[ $rc = 2 ] || fail "mismatch: exit $rc: $out"
grep -q "rank 1 was started differently from rank 0: partition 3,2 (rank 0 has 2,3)" <<<"$out" || fail "mismatch: $out"
echo "ok: mismatched partitions refused"
out=$(timeout 30 $MPIRUN -np 1 "$bin" generate --device cpu --model "$model" --prompt-ids 1,2 : \
      -np 1 "$bin" generate --device cpu --model "$data/tinyq" --prompt-ids 1,2 2>&1); rc=$?
[ $rc = 2 ] || fail "model mismatch: exit $rc: $out"
grep -q "rank 1 was started differently from rank 0: .*config [0-9a-f]* (rank 0 has" <<<"$out" || fail "model mismatch: $out"
echo "ok: mismatched models refused"
out=$(timeout 30 $MPIRUN -np 2 "$bin" generate --device cpu --model "$model" --prompt-ids 1,2 --pp 3 2>&1); rc=$?
[ $rc = 2 ] && grep -q "under mpirun the number of ranks is the number of stages" <<<"$out" || fail "--pp vs ranks: $out"
echo "ok: --pp different from the number of ranks refused"
