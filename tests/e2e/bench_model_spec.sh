#!/usr/bin/env bash
# seekpipe_bench_model --speculative-tokens on the CPU backend: for every batch size and K a "spec"
# row with positive t_decode, t_verify(K), t_draft(K), an acceptance in [0, 1], a context past the
# prompt, and the derived per-token times equal to (t_verify + t_draft) (1 - a) / (1 - a^(K+1));
# the same on a dummy V4-Flash-shaped model; a model without an MTP layer and bad K refused.
. "$(dirname "$0")/lib.sh"
bench=$1 data=$2
# check OUTPUT BATCHES KS CONTEXT: the table rows of every batch, the spec row of every (batch, K).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
check() {
  printf '%s\n' "$1" >"$tmp/out"
  python3 - "$tmp/out" "$2" "$3" "$4" <<'PY' || fail "bench output: $1"
import sys
text = open(sys.argv[1]).read()
batches = [int(x) for x in sys.argv[2].split(',')]
ks = [int(x) for x in sys.argv[3].split(',') if x]
context = int(sys.argv[4])
def num(s):
    v = float(s)
    assert v == v and abs(v) != float('inf'), s
    return v
rows, spec = {}, {}
for line in text.splitlines():
    f = line.split()
    if len(f) == 6 and f[0].isdigit() and f[1].isdigit():
        rows[int(f[0])] = [num(x) for x in f[2:5]]
    if f and f[0] == 'spec':
        assert len(f) == 12, 'spec row of %d fields: %s' % (len(f), line)
        spec[(int(f[1]), int(f[2]))] = (int(f[3]), [num(x) for x in f[4:]])
for b in batches:
    assert b in rows, 'no table row for batch %d' % b
    assert all(v > 0 for v in rows[b]), 'table row of batch %d not positive: %s' % (b, rows[b])
    for k in ks:
        assert (b, k) in spec, 'no spec row for batch %d, K %d' % (b, k)
        ctx, (t_dec, t_ver, t_draft, acc, *derived) = spec[(b, k)]
        assert ctx > context, 'batch %d K %d: context %d not past the prompt' % (b, k, ctx)
        assert t_dec > 0 and t_ver > 0 and t_draft > 0, 'batch %d K %d: times %s' % (b, k, spec[(b, k)])
        assert abs(t_dec - rows[b][0]) <= 1e-3, 'batch %d: t_decode %s is not the table\'s %s' % (b, t_dec, rows[b][0])
        assert 0 <= acc <= 1, 'batch %d K %d: acceptance %s' % (b, k, acc)
        for a, d in zip((0.5, 0.6, 0.7, 0.8), derived):
            want = (t_ver + t_draft) * (1 - a) / (1 - a ** (k + 1))
            assert d > 0 and abs(d - want) <= 2e-3 + 1e-3 * want, 'batch %d K %d a %s: derived %s, expected %s' % (b, k, a, d, want)
assert len(spec) == len(batches) * len(ks), 'spec rows %s' % sorted(spec)
print('ok: %d spec rows' % len(spec))
PY
}
args=(--device cpu --threads 1 --prefill 16)
out=$("$bench" --model "$data/tiny" "${args[@]}" --batch 1,2 --context 24 --decode-steps 4 --speculative-tokens 2,1) || fail "bench on tiny: $out"
check "$out" 1,2 1,2 24
# Without the flag: the table alone, as before.
out=$("$bench" --model "$data/tiny" "${args[@]}" --batch 1 --context 24 --decode-steps 4) || fail "bench on tiny without speculation: $out"
check "$out" 1 "" 24
out=$("$bench" --model "$data/configs/flash-mini" --load-format dummy "${args[@]}" --batch 1 --context 20 --decode-steps 2 --speculative-tokens 3) || fail "bench on flash-mini (dummy): $out"
check "$out" 1 3 20
expect_error 2 "--speculative-tokens needs the MTP layer: config.json has num_nextn_predict_layers 0" -- \
  "$bench" --model "$data/tiny" "${args[@]}" --batch 1 --context 24 --speculative-tokens 1 --override-config '{"num_nextn_predict_layers": 0}'
expect_error 2 "--speculative-tokens: expected draft token counts in \[1, 8\], got 9" -- \
  "$bench" --model "$data/tiny" "${args[@]}" --batch 1 --speculative-tokens 1,9
expect_error 2 "--speculative-tokens K1,K2" -- "$bench" --model "$data/tiny" "${args[@]}" --speculative mtp
echo "all bench_model speculative checks passed"
