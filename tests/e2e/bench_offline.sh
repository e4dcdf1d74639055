#!/usr/bin/env bash
# bench offline on the tiny fixture (CPU): bench serve's random workload through the engine loop
# in process. MODE local: pp 1 and --pp 2 (threads) count every request and token, the JSON file
# parses and has each request, the same seed draws the same dataset at every split, concurrency 1
# runs the requests one after another, a request the engine refuses is a failure (exit 1), a stage
# failing mid-run ends the run (exit 3), and the flag mistakes are errors before the model loads;
# MODE mpi: the same counts under mpirun -np 2.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2 mode_set=$3
model=$data/tiny
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
common=(bench offline --device cpu --model "$model" --threads 1)
# check_json FILE N IN OUT [RATIO]: N successful requests; each asked IN input and OUT output tokens
# (exactly with ratio 0, within [len * (1 - r), len * (1 + r)] otherwise); the totals add up.
check_json() {
  python3 - "$@" <<'PY' || fail "result JSON $1: see above"
import json, math, sys
path, n, inp, out = sys.argv[1], *map(int, sys.argv[2:5])
r = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
j = json.load(open(path))
def rng(l):
    lo = max(1, math.floor(l * (1 - r)))
    return lo, max(lo, math.ceil(l * (1 + r)))
reqs = j["requests"]
assert j["successful"] == n and j["failed"] == 0 and j["num_prompts"] == n, j
assert len(reqs) == n, reqs
for q in reqs:
    assert rng(inp)[0] <= q["input_tokens"] <= rng(inp)[1], q
    assert rng(out)[0] <= q["output_tokens"] <= rng(out)[1], q
    assert 0 < q["ttft_ms"] <= q["e2e_ms"], q
assert j["total_input_tokens"] == sum(q["input_tokens"] for q in reqs), j
assert j["total_output_tokens"] == sum(q["output_tokens"] for q in reqs), j
if r == 0:
    assert j["total_input_tokens"] == n * inp and j["total_output_tokens"] == n * out, j
for k in ("ttft", "tpot", "itl", "e2e_latency"):
    assert set(j[k]) == {"mean_ms", "median_ms", "p90_ms", "p99_ms"}, j[k]
assert j["duration_s"] > 0 and j["output_throughput"] > 0 and j["load_s"] > 0, j
assert len(j["stage_busy"]) == j["stages"], j
PY
}
# The requests' drawn lengths, in order (the dataset's fingerprint).
lengths() { python3 -c "import json,sys; print([(q['input_tokens'], q['output_tokens']) for q in json.load(open(sys.argv[1]))['requests']])" "$1"; }

modes="pp1 pp2"
[ "$mode_set" = mpi ] && modes=mpi
for mode in $modes; do
  run=("${common[@]}" --num-prompts 6 --random-input-len 40 --random-output-len 5 --max-concurrency 3
       --num-warmups 2 --result-json "$tmp/$mode.json")
  case $mode in
    pp1) out=$(timeout 300 "$bin" "${run[@]}" 2>&1) ;;
    pp2) out=$(timeout 300 "$bin" "${run[@]}" --pp 2 2>&1) ;;
    mpi) out=$(timeout 300 $MPIRUN -np 2 "$bin" "${run[@]}" 2>&1) ;;
  esac
  rc=$?
  [ $rc = 0 ] || fail "$mode exited $rc: $out"
  grep -Eq "^Successful requests: +6$" <<<"$out" || fail "$mode: successful count: $out"
  grep -Eq "^Failed requests: +0$" <<<"$out" || fail "$mode: failed count: $out"
  grep -Eq "^Total generated tokens: +30$" <<<"$out" || fail "$mode: generated tokens: $out"
  grep -Eq "^Total input tokens: +240$" <<<"$out" || fail "$mode: input tokens: $out"
  grep -Eq "loaded and started in [0-9.]+ s" <<<"$out" || fail "$mode: no start-up time: $out"
  [ "$(grep -c '^json: ' <<<"$out")" = 1 ] || fail "$mode: the json line is not printed once: $out"
  python3 -c "import json,sys; json.loads(sys.argv[1][6:])" "$(grep '^json: ' <<<"$out")" ||
    fail "$mode: the json line does not parse: $out"
  check_json "$tmp/$mode.json" 6 40 5
  if [ "$mode" != pp1 ]; then
    grep -Eq "^pipeline: stage 0 busy [0-9.]+% \([0-9]+ steps\), stage 1 busy [0-9.]+% \([0-9]+ steps\); bubble" <<<"$out" ||
      fail "$mode: no busy/bubble line: $out"
  fi
  echo "ok: $mode: 6 requests, 240 input and 30 output tokens"
done
[ "$mode_set" = mpi ] && exit 0

# A range ratio draws the lengths from the seed: the same dataset at pp 1 and pp 2.
for pp in 1 2; do
  "$bin" "${common[@]}" --pp $pp --num-prompts 5 --random-input-len 30 --random-output-len 6 --random-range-ratio 0.5 \
    --seed 7 --result-json "$tmp/ratio$pp.json" >"$tmp/ratio$pp.out" 2>&1 || fail "ratio pp $pp: $(cat "$tmp/ratio$pp.out")"
  check_json "$tmp/ratio$pp.json" 5 30 6 0.5
done
[ "$(lengths "$tmp/ratio1.json")" = "$(lengths "$tmp/ratio2.json")" ] ||
  fail "the same seed drew different lengths: $(lengths "$tmp/ratio1.json") vs $(lengths "$tmp/ratio2.json")"
echo "ok: --random-range-ratio 0.5: lengths in range, the same at pp 1 and 2: $(lengths "$tmp/ratio1.json")"

# Concurrency 1: one request after another, so their latencies fit in the run's duration.
"$bin" "${common[@]}" --num-prompts 4 --random-input-len 20 --random-output-len 4 --max-concurrency 1 \
  --result-json "$tmp/c1.json" >"$tmp/c1.out" 2>&1 || fail "concurrency 1: $(cat "$tmp/c1.out")"
check_json "$tmp/c1.json" 4 20 4
python3 - "$tmp/c1.json" <<'PY' || fail "concurrency 1 overlapped requests"
import json, sys
j = json.load(open(sys.argv[1]))
total = sum(q["e2e_ms"] for q in j["requests"])
assert total <= j["duration_s"] * 1e3 + 1e-6, (total, j["duration_s"])
assert j["max_concurrency"] == 1, j
PY
echo "ok: --max-concurrency 1 runs the requests one at a time, TTFT <= E2E each"

# A request the engine refuses (its prompt needs more state blocks than the pool has) fails: exit 1.
out=$("$bin" "${common[@]}" --num-prompts 3 --random-input-len 300 --random-output-len 2 --num-state-blocks 1 2>&1); rc=$?
[ $rc = 1 ] || fail "refused requests: expected exit 1, got $rc: $out"
grep -Eq "^Failed requests: +3$" <<<"$out" || fail "refused requests not counted: $out"
grep -q "first error: .*state blocks" <<<"$out" || fail "no first error: $out"
echo "ok: refused requests count as failed, exit 1"

# A stage failing mid-run ends the benchmark with the pipeline's error (exit 3), not a hang or crash.
out=$(timeout 120 "$bin" "${common[@]}" --pp 2 --num-prompts 4 --random-input-len 20 --random-output-len 6 --fault-inject 1:3:error 2>&1); rc=$?
[ $rc = 3 ] || fail "a failing stage: expected exit 3, got $rc: $out"
grep -q "stage 1 (rank 1) failed: injected fault at step 3" <<<"$out" || fail "a failing stage is not named: $out"
echo "ok: a stage failing mid-run ends it with exit 3"

# Flag mistakes: before the model loads (no 'loaded' line), exit 2.
expect_error 2 "--vocab-size 300 exceeds the model's vocab_size 256" -- "$bin" "${common[@]}" --vocab-size 300
expect_error 2 "--random-input-len 4000 \+ --random-output-len 200 need up to 4000 \+ 200 = 4200 tokens .*more than --max-model-len 4096" -- "$bin" "${common[@]}" --random-input-len 4000 --random-output-len 200
expect_error 2 "with --random-range-ratio 0.5\), more than --max-model-len 100" -- "$bin" "${common[@]}" --random-input-len 60 --random-output-len 10 --random-range-ratio 0.5 --max-model-len 100
expect_error 2 "--result-json: cannot write $tmp/no/such/dir/r.json: directory" -- "$bin" "${common[@]}" --result-json "$tmp/no/such/dir/r.json"
expect_error 2 "unknown flag --request-rate" -- "$bin" "${common[@]}" --request-rate 4
expect_error 2 "--max-concurrency: expected an integer" -- "$bin" "${common[@]}" --max-concurrency -1
expect_error 2 "--model is required" -- "$bin" bench offline --num-prompts 2
expect_error 2 "expected 'seekpipe bench serve \[flags\]' or 'seekpipe bench offline \[flags\]'" -- "$bin" bench offlin
out=$("$bin" "${common[@]}" --vocab-size 300 2>&1)
! grep -q "loaded" <<<"$out" || fail "the model loaded before the flag error: $out"
"$bin" bench offline --help | grep -q -- "--num-warmups" || fail "--help does not list --num-warmups"
echo "all bench offline checks passed"
