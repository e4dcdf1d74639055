#!/usr/bin/env bash
# --trace writes a Chrome trace with a track per stage; inspect --pp plans the full-size model
# from its config alone; generate --pp 4 runs in one command and matches --pp 1.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
trace=$(mktemp --suffix .json)
out=$("$bin" generate --device cpu --model "$data/small" --prompt-ids 1,2,3,4,5 --prompt-ids 9,8,7 --max-tokens 6 --threads 1 \
      --pp 3 --trace "$trace") || fail "generate --trace: $out"
grep -q "bubble" <<<"$out" || fail "no pipeline summary: $out"
# The CPU pipeline stages the boundary in host memory: stages 0 and 1 send it, the last sends none.
summary=$(grep -E "^boundary: 0 bytes device to device \(nccl\), [1-9][0-9]* bytes through host memory" <<<"$out") ||
  fail "no boundary line: $out"
python3 - "$trace" "$(grep -oE '[0-9]+ bytes through' <<<"$summary" | cut -d' ' -f1)" <<'PY' || fail "bad trace"
import json, sys
t = json.load(open(sys.argv[1]))["traceEvents"]
stages = {e["tid"] for e in t if e.get("ph") == "X"}
names = {e["cat"] for e in t if e.get("ph") == "X"}
assert stages == {0, 1, 2}, stages
assert {"compute", "send", "wait"} <= names, names
assert all(e["dur"] >= 0 for e in t if e.get("ph") == "X")
meta = {e["tid"]: e["args"] for e in t if e.get("ph") == "M"}
host = [meta[s]["boundary_bytes_host"] for s in (0, 1, 2)]
assert host[0] > 0 and host[1] > 0 and host[2] == 0, host
assert sum(host) == int(sys.argv[2]), (host, sys.argv[2])
assert all(meta[s]["boundary_bytes_device"] == 0 for s in (0, 1, 2)), meta
print("trace ok:", len(t), "events")
PY
rm -f "$trace"
a=$("$bin" generate --device cpu --model "$data/tiny" --prompt-ids 10,20,30 --prompt-ids 5 --max-tokens 12 --ignore-eos --threads 1)
b=$("$bin" generate --device cpu --model "$data/tiny" --prompt-ids 10,20,30 --prompt-ids 5 --max-tokens 12 --ignore-eos --threads 1 --pp 4)
[ "$(grep 'output ids' <<<"$a")" = "$(grep 'output ids' <<<"$b")" ] || fail "pp 4 output differs: $a / $b"
[ "$(hash_of "$a")" = "$(hash_of "$b")" ] || fail "pp 4 logits differ"
echo "ok: generate --pp 4 equals --pp 1"
# The stages' loads add up to the whole model: each read only its own tensors, none twice.
whole=$(grep -o 'loaded [0-9]* tensors' <<<"$a" | awk '{s += $2} END {print s}')
parts=$(grep -o 'loaded [0-9]* tensors' <<<"$b" | awk '{s += $2} END {print s}')
[ "$(grep -c 'loaded' <<<"$b")" = 4 ] && [ "$whole" = "$parts" ] || fail "stage loads $parts tensors, whole model $whole"
echo "ok: 4 stages loaded $parts tensors together, as the whole model"
plan=$("$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 4) || fail "inspect --pp: $plan"
grep -q "partition 11,11,11,10 (vLLM's split)" <<<"$plan" || fail "inspect plan: $plan"
grep -q "+head" <<<"$plan" || fail "inspect plan lacks the head: $plan"
plan=$("$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 4 --pp-partition auto --max-num-seqs 1)
grep -q "(cost model)" <<<"$plan" || fail "auto plan: $plan"
echo "ok: inspect plans the full-size model from its config"
# Measured stage times fit the head's cost (--pp-head-cost) and give the auto split with it.
fit=$("$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 4 --pp-partition 11,11,11,10 --max-num-seqs 1 --stage-ms 9.11,9.11,9.16,9.32) || fail "inspect --stage-ms: $fit"
grep -q "^fitted to --stage-ms at partition 11,11,11,10: --pp-head-cost 0\.[0-9]*" <<<"$fit" || fail "fit: $fit"
k=$(sed -n 's/.*--pp-head-cost \([0-9.]*\) .*/\1/p' <<<"$fit")
plan=$("$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 4 --pp-partition auto --max-num-seqs 1 --pp-head-cost "$k")
grep -q "partition $(sed -n 's/.*auto with it: \([0-9,]*\)$/\1/p' <<<"$fit") (cost model)" <<<"$plan" || fail "auto with --pp-head-cost $k: $plan"
echo "ok: inspect --stage-ms fits --pp-head-cost $k, and auto uses it"
expect_error 2 "--stage-ms: 3 times for 4 stages" -- "$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 4 --stage-ms 1,2,3
expect_error 2 "--stage-ms: 'x' is not a number" -- "$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 2 --stage-ms 1,x
expect_error 2 "--stage-ms needs --pp" -- "$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --stage-ms 1,2
expect_error 2 "--pp-head-cost: used only by --pp-partition auto" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --pp-head-cost 0.5
expect_error 2 "covers 44 layers" -- "$bin" inspect --model "$data/configs/deepseek-v4-flash" --load-format dummy --pp 4 --pp-partition 11,11,11,11
expect_error 2 "--trace: cannot write /nonexistent/t.json" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --trace /nonexistent/t.json
expect_error 2 "expected vllm, auto, or positive integers" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --pp-partition balanced
expect_error 2 "--fault-inject '1:x'" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --fault-inject 1:x
