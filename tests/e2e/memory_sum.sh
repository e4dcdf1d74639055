#!/usr/bin/env bash
# The host-memory check sums the stages that share a host: 5 stages, each of which fits alone,
# are refused when together they exceed the process's ulimit -v (threads) or the host's RAM
# (mpirun, 5 ranks on this host), naming the total and what would fit. Nothing is allocated.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
model=$data/configs/flash-mini  # sequence state ~780 B per sequence and token, 1/3 on a middle stage
# Without the prefix cache's snapshot slots, so the sums below are the sequence state's alone
# (the last check counts the snapshots).
base=(generate --device cpu --model "$model" --load-format dummy --prompt-ids 1,2 --threads 1 --max-num-seqs 64 --no-enable-prefix-caching)

# 1. Threads: 12.46 GiB over 5 stages (the largest 4.12 GiB) in a process with ulimit -v ~7.6 GiB.
out=$( (ulimit -v 8000000; timeout 60 "$bin" "${base[@]}" --pp 5 --max-model-len 262144) 2>&1); rc=$?
[ $rc = 2 ] || fail "threads: exit $rc, expected 2: $out"
grep -q "the 5 stages of this process need 12.46 GiB in total (stage 0: .*, 2: 4.12 GiB" <<<"$out" || fail "threads: total not named: $out"
grep -q "ulimit -v leaves .* to this process: --max-model-len [0-9]* would fit, or --max-num-seqs [0-9]* would fit, or run each stage as its own process under mpirun" <<<"$out" || fail "threads: no fitting suggestion: $out"
echo "ok: threads: $(grep -o 'the 5 stages.*in total' <<<"$out"); $(grep -o 'ulimit -v leaves.*' <<<"$out")"

# 2. mpirun, 5 ranks on this host: the sum is 1.2 x this machine's RAM, the largest stage 0.4 x.
ram_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
len=$(( ram_kib * 1024 / 10 * 12 / (64 * 780) ))
out=$(timeout 120 $MPIRUN -np 5 "$bin" "${base[@]}" --max-model-len $len 2>&1); rc=$?
[ $rc = 2 ] || fail "mpirun: exit $rc, expected 2: $out"
grep -q "the 5 stages on host [^ ]* need .* in total" <<<"$out" || fail "mpirun: total not named: $out"
grep -q "but this host has RAM .*: --max-model-len [0-9]* would fit, or --max-num-seqs [0-9]* would fit, or spread the stages over at least 2 hosts" <<<"$out" || fail "mpirun: no fitting suggestion: $out"
fit=$(grep -o -- "--max-model-len [0-9]* would fit" <<<"$out" | grep -o "[0-9]*")
[ "$fit" -lt "$len" ] || fail "mpirun: suggested --max-model-len $fit is not below $len"
[ "$(grep -c 'error: the 5 stages' <<<"$out")" = 1 ] || fail "mpirun: the refusal is not printed once: $out"
echo "ok: mpirun -np 5 --max-model-len $len: $(grep -o 'the 5 stages.*in total' <<<"$out"); $(grep -o 'this host has RAM.*' <<<"$out")"

# 3. The prefix cache's snapshot slots are counted (and named in the refusal).
out=$( (ulimit -v 8000000; timeout 60 "$bin" generate --device cpu --model "$model" --load-format dummy --prompt-ids 1,2 --threads 1 --max-num-seqs 64 --pp 5 --max-model-len 262144 --prefix-cache-slots 64) 2>&1); rc=$?
[ $rc = 2 ] || fail "snapshots: exit $rc, expected 2: $out"
grep -q "the 5 stages of this process need 12.5[0-9] GiB in total .*prefix-cache snapshots (--prefix-cache-slots 64): [0-9.]* MiB" <<<"$out" || fail "snapshots not counted: $out"
echo "ok: snapshots: $(grep -o 'prefix-cache snapshots[^)]*): [0-9.]* MiB' <<<"$out")"
