#!/usr/bin/env bash
# Prefix caching through the real binary: two prompts sharing a 300-token prefix, one sequence
# slot so the second starts after the first has finished. With caching the second computes only
# what follows the 256-token block boundary (the summary says 256 tokens were cached) and prints
# the same output ids and logits_hash as without caching; MODE local: at pp 1 and --pp 2
# (threads), and the flag mistakes are errors; MODE mpi: under mpirun -np 2.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2 mode_set=$3
model=$data/tiny
ids() { python3 -c "import random,sys; r=random.Random(int(sys.argv[1])); print(','.join(str(r.randrange(2, 250)) for _ in range(int(sys.argv[2]))))" "$1" "$2"; }
prefix=$(ids 1 300)
p0="$prefix,$(ids 2 20)"
p1="$prefix,$(ids 3 37)"
common=(generate --device cpu --model "$model" --threads 1 --max-num-seqs 1 --max-tokens 6 --ignore-eos --prompt-ids "$p0" --prompt-ids "$p1")
plain=$("$bin" "${common[@]}" --no-enable-prefix-caching 2>&1) || fail "without caching: $plain"
want=$(hash_of "$plain")
! grep -q "prefix cache:" <<<"$plain" || fail "caching off still reports a prefix cache: $plain"
modes="pp1 pp2"
[ "$mode_set" = mpi ] && modes=mpi
for mode in $modes; do
  case $mode in
    pp1) out=$(timeout 300 "$bin" "${common[@]}" 2>&1) ;;
    pp2) out=$(timeout 300 "$bin" "${common[@]}" --pp 2 2>&1) ;;
    mpi) out=$(timeout 300 $MPIRUN -np 2 "$bin" "${common[@]}" 2>&1) ;;
  esac
  rc=$?
  [ $rc = 0 ] || fail "$mode exited $rc: $out"
  [ "$(hash_of "$out")" = "$want" ] || fail "$mode: $(hash_of "$out") differs from the uncached $want: $out"
  diff <(grep "output ids" <<<"$out") <(grep "output ids" <<<"$plain") >/dev/null || fail "$mode: output ids differ: $out"
  grep -q "prefix cache: 256 of 657 prompt tokens cached" <<<"$out" || fail "$mode: no hit of 256 tokens reported: $out"
  # 320 + 337 prompt tokens, 256 of them cached: 401 computed.
  grep -q "over 401 prefill + 10 decode tokens" <<<"$out" || fail "$mode: computed tokens: $out"
  echo "ok: $mode $want"
done
[ "$mode_set" = mpi ] && exit 0
expect_error 2 "--enable-prefix-caching and --no-enable-prefix-caching contradict" -- "$bin" generate --device cpu --model "$model" --prompt-ids 1 --enable-prefix-caching --no-enable-prefix-caching
expect_error 2 "--prefix-cache-slots has no effect with --no-enable-prefix-caching" -- "$bin" generate --device cpu --model "$model" --prompt-ids 1 --no-enable-prefix-caching --prefix-cache-slots 4
expect_error 2 "--prefix-cache-slots: expected an integer in \[1" -- "$bin" generate --device cpu --model "$model" --prompt-ids 1 --prefix-cache-slots 0
expect_error 2 "--enable-prefix-caching=false: to turn prefix caching off, use --no-enable-prefix-caching" -- "$bin" generate --device cpu --model "$model" --prompt-ids 1 --enable-prefix-caching=false
expect_error 2 "--prefix-cache-slots has no effect" -- "$bin" inspect --model "$model" --no-enable-prefix-caching --prefix-cache-slots 2
"$bin" inspect --model "$model" --prefix-cache-slots 3 | grep -q "prefix cache: 3 snapshot slots" || fail "inspect does not count the snapshot slots"
"$bin" inspect --model "$model" --no-enable-prefix-caching | grep -q "prefix cache: off" || fail "inspect does not say caching is off"
echo "all prefix cache checks passed"
