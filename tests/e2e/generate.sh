#!/usr/bin/env bash
# generate: greedy output equals the golden greedy tokens of the tiny fixture's prompt 0, and a
# dummy model built from a config alone runs.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
ids=$(python3 - "$data/tiny/golden.safetensors" <<'PY'
import json, struct, sys
f = open(sys.argv[1], 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); base = 8 + n
def ints(name):
    t = h[name]; b, e = t['data_offsets']; f.seek(base + b); raw = f.read(e - b)
    return list(struct.unpack('<%dq' % ((e - b) // 8), raw))
print(','.join(map(str, ints('p0.input_ids'))), ' '.join(map(str, ints('p0.greedy_tokens')[:8])))
PY
)
prompt=${ids%% *}; want=${ids#* }
out=$("$bin" generate --device cpu --model "$data/tiny" --prompt-ids "$prompt" --max-tokens 8 --ignore-eos) || fail "generate failed: $out"
got=$(grep -o 'output ids:[0-9 ]*' <<<"$out" | sed 's/output ids: *//; s/ *$//')
[ "$got" = "$want" ] || fail "greedy tokens '$got', golden '$want'"
echo "ok: greedy tokens match the golden continuation: $got"
# A dummy model from a config alone: V4-Flash's layer kinds and formats at a small width.
out=$("$bin" generate --device cpu --model "$data/configs/flash-mini" --load-format dummy --prompt-ids 5,6,7 --max-tokens 4 \
      --ignore-eos --max-model-len 64) || fail "dummy generate failed: $out"
n=$(grep -o 'output ids:[0-9 ]*' <<<"$out" | wc -w)
[ "$n" = 6 ] || fail "dummy generate printed '$out'"
echo "ok: dummy flash-mini generates"
# Base-model formats: FP8 experts with 128x128 block scales, from a config alone.
out=$("$bin" generate --device cpu --model "$data/configs/flash-mini-base" --load-format dummy --prompt-ids 5,6,7 --max-tokens 3 \
      --ignore-eos --max-model-len 64) || fail "dummy fp8-expert generate failed: $out"
[ "$(grep -o 'output ids:[0-9 ]*' <<<"$out" | wc -w)" = 5 ] || fail "dummy fp8-expert generate printed '$out'"
echo "ok: dummy flash-mini-base (FP8 experts) generates"
