#!/usr/bin/env bash
# Text in and out: generate --prompt on the bundled trained models reproduces the greedy
# continuations of their eval.json (ids and text, BOS prepended per tokenizer_config.json), and
# every text mistake is a clear error with exit 2.
. "$(dirname "$0")/lib.sh"
bin=$1 models=$2
for m in kjv-v4-tiny-fp8 kjv-v4-tiny; do
  dir=$models/$m
  # Every eval.json prompt in one batch; 40 greedy tokens each (fp32, as eval.json was made).
  args=$(python3 - "$dir/eval.json" <<'PY'
import json, shlex, sys
print(" ".join("--prompt " + shlex.quote(g["prompt"]) for g in json.load(open(sys.argv[1]))["greedy_40"]))
PY
)
  out=$(eval "\"$bin\" generate --model \"$dir\" $args --max-tokens 40 --ignore-eos") || fail "$m: generate --prompt failed: $out"
  python3 - "$dir/eval.json" "$out" <<'PY' || fail "$m: continuations differ from eval.json"
import json, re, sys
ev = json.load(open(sys.argv[1]))["greedy_40"]
out = sys.argv[2]
for i, g in enumerate(ev):
    ids = [int(x) for x in re.search(r"^prompt %d output ids: ([0-9 ]*)" % i, out, re.M).group(1).split()]
    m = re.search(r'^prompt %d text: (".*") -> (".*")$' % i, out, re.M)
    prompt, text = json.loads(m.group(1)), json.loads(m.group(2))
    assert prompt == g["prompt"], (prompt, g["prompt"])
    assert ids == g["greedy_ids"], (i, ids, g["greedy_ids"])
    assert text == g["text"], (i, text, g["text"])
print("ok: %d prompts reproduce eval.json's greedy ids and text" % len(ev))
PY
done
# The prompt ids (BOS first) are the ones eval.json lists.
out=$("$bin" tokenize --model "$models/kjv-v4-tiny-fp8" --text "And Jesus said unto them,")
[ "$out" = "8 tokens: 0 34 262 660 394 325 341 13" ] || fail "tokenize printed '$out'"
out=$("$bin" tokenize --model "$models/kjv-v4-tiny-fp8" --text "And Jesus" --add-bos no)
[ "$out" = "3 tokens: 34 262 660" ] || fail "tokenize --add-bos no printed '$out'"
out=$("$bin" tokenize --model "$models/kjv-v4-tiny-fp8" --ids 0,34,262,660,1)
[ "$out" = '"And Jesus"' ] || fail "tokenize --ids printed '$out'"
echo "ok: tokenize"

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fp8=$models/kjv-v4-tiny-fp8
expect_error 2 "--prompt and --prompt-ids are exclusive" -- "$bin" generate --model "$fp8" --prompt hi --prompt-ids 1,2
expect_error 2 "--prompt: expected a non-empty value" -- "$bin" generate --model "$fp8" --prompt ""
# A model directory without tokenizer.json (the fixtures have none).
expect_error 2 "cannot open .*tiny/tokenizer.json: text prompts need the model's tokenizer.json" -- "$bin" generate --model "$models/../tests/data/tiny" --prompt hi
mkdir "$tmp/bad"; cp "$fp8/config.json" "$tmp/bad/"; echo '{"model": {"type": "BPE", "vocab": []}}' > "$tmp/bad/tokenizer.json"
expect_error 2 "bad/tokenizer.json: field 'model.vocab': expected an object" -- "$bin" generate --model "$tmp/bad" --prompt hi
echo '{"model": ' > "$tmp/bad/tokenizer.json"
expect_error 2 "bad/tokenizer.json: not valid JSON" -- "$bin" generate --model "$tmp/bad" --prompt hi
cp "$fp8/tokenizer.json" "$tmp/bad/"; echo '{"add_bos_token": "yes"}' > "$tmp/bad/tokenizer_config.json"
expect_error 2 "tokenizer_config.json: field 'add_bos_token': expected true or false" -- "$bin" generate --model "$tmp/bad" --prompt hi
echo '{"add_bos_token": true, "bos_token": "<nope>"}' > "$tmp/bad/tokenizer_config.json"
expect_error 2 "bos_token \"<nope>\" is not a token of" -- "$bin" generate --model "$tmp/bad" --prompt hi
# score: the data file's mistakes name the line.
printf '{"text": "In the beginning"}\n\n{"text": 3}\n' > "$tmp/d.jsonl"
expect_error 2 "d.jsonl line 3: field 'text' must be a string, got number" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl"
printf '{"text": "In the beginning"}\n{"text": "x"\n' > "$tmp/d.jsonl"
expect_error 2 "d.jsonl line 2: not valid JSON" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl"
printf '{"text": ""}\n' > "$tmp/d.jsonl"
expect_error 2 "d.jsonl line 1: empty text" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl"
printf '{"body": "a"}\n' > "$tmp/d.jsonl"
expect_error 2 "d.jsonl line 1: no field 'text' \(choose it with --field\)" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl"
printf '[1]\n' > "$tmp/d.jsonl"
expect_error 2 "d.jsonl line 1: expected a JSON object" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl"
: > "$tmp/d.jsonl"
expect_error 2 "d.jsonl has no texts" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl"
expect_error 2 "--data: cannot open" -- "$bin" score --model "$fp8" --data "$tmp/none.jsonl"
expect_error 2 "--data is required" -- "$bin" score --model "$fp8"
printf '{"text": "a"}\n' > "$tmp/d.jsonl"
expect_error 2 "line 1: the text gives 1 token\(s\); at least 2" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl" --add-bos no
expect_error 2 "--max-tokens-per-text: expected an integer in \[2" -- "$bin" score --model "$fp8" --data "$tmp/d.jsonl" --max-tokens-per-text 1
echo "all text checks passed"
