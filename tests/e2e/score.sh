#!/usr/bin/env bash
# score: the held-out numbers of the bundled models (models/README.md, eval.json: first 512
# tokens of each of the 60 chapters of kjv_val_public.jsonl, BOS first) on the CPU backend, and the
# same bits for every pipeline split on a shorter run: --pp 2 threads, or (mode mpi) mpirun -np 2.
. "$(dirname "$0")/lib.sh"
bin=$1 models=$2 mode=${3:-numbers}
data=$models/kjv_val_public.jsonl
# Pipeline splits: identical numbers (per-position NLLs are summed in order on the last stage).
short=(score --model "$models/kjv-v4-tiny-fp8" --data "$data" --max-tokens-per-text 48 --max-num-batched-tokens 256)
one=$("$bin" "${short[@]}" | grep "^loss") || fail "short score failed"
if [ "$mode" = mpi ]; then
  mpi=$($MPIRUN -np 2 "$bin" "${short[@]}" --threads 1 | grep "^loss") || fail "mpirun -np 2 score failed"
  [ "$one" = "$mpi" ] || fail "mpirun -np 2 gives '$mpi', one stage '$one'"
  echo "ok: one stage and mpirun -np 2 agree: $one"
  exit 0
fi
two=$("$bin" "${short[@]}" --pp 2 --threads 1 | grep "^loss") || fail "--pp 2 score failed"
[ "$one" = "$two" ] || fail "--pp 2 gives '$two', one stage '$one'"
echo "ok: one stage and --pp 2 agree: $one"
for m in kjv-v4-tiny-fp8 kjv-v4-tiny; do
  out=$("$bin" score --model "$models/$m" --data "$data") || fail "$m: score failed: $out"
  echo "$out" | grep -E "^(scored|[0-9]+ steps|loss)"
  python3 - "$models/$m/eval.json" "$out" <<'PY' || fail "$m: score differs from eval.json"
import json, re, sys
want = json.load(open(sys.argv[1]))["val_public"]
m = re.search(r"^loss (\S+)  perplexity (\S+)  top1 (\S+)$", sys.argv[2], re.M)
loss, ppl, top1 = map(float, m.groups())
n = int(re.search(r"(\d+) predicted tokens", sys.argv[2]).group(1))
assert n == want["tokens"], (n, want["tokens"])
assert abs(loss - want["loss"]) <= 1e-4, (loss, want["loss"])
assert abs(top1 - want["top1"]) <= 1e-4, (top1, want["top1"])
assert abs(ppl - want["ppl"]) <= 1e-2, (ppl, want["ppl"])
print("ok: loss %.6f (eval.json %.6f, diff %.1e), ppl %.4f, top1 %.6f over %d tokens"
      % (loss, want["loss"], abs(loss - want["loss"]), ppl, top1, n))
PY
done
