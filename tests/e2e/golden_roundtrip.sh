#!/usr/bin/env bash
# `seekpipe golden` writes the engine's own greedy run in the fixtures' format; verify on the same
# weights and backend reproduces it exactly (the CPU backend is batch-invariant), also at pp 2, and
# a dummy model with --override-config works end to end.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
out=$("$bin" golden --device cpu --model "$data/tiny" --prompt-ids 1,2,3,4 --prompt-ids 9,8 --max-tokens 5 --out "$tmp/g.safetensors") || fail "golden: $out"
out=$("$bin" verify --device cpu --model "$data/tiny" --golden "$tmp/g.safetensors" --atol 0) || fail "verify own golden: $out"
grep -q "top1_agreement 1.0000, median_rel_err 0.000e+00" <<<"$out" || fail "not exact: $out"
out=$("$bin" verify --device cpu --model "$data/tiny" --golden "$tmp/g.safetensors" --atol 0 --pp 2) || fail "verify own golden at pp 2: $out"
echo "ok: golden round trip exact at pp 1 and 2"
flags=(--device cpu --model "$data/configs/flash-mini" --load-format dummy --override-config '{"num_hidden_layers": 3}' --max-model-len 64)
out=$("$bin" golden "${flags[@]}" --prompt-ids 5,6,7 --max-tokens 3 --out "$tmp/d.safetensors") || fail "dummy golden: $out"
out=$("$bin" verify "${flags[@]}" --golden "$tmp/d.safetensors" --atol 0) || fail "dummy verify: $out"
out=$("$bin" inspect --model "$data/configs/flash-mini" --load-format dummy --override-config '{"num_hidden_layers": 3}') || fail "inspect: $out"
grep -q "layers 3" <<<"$out" || fail "override not applied: $out"
expect_error 2 "--override-config" -- "$bin" inspect --model "$data/tiny" --override-config "[1,"
expect_error 2 "with --override-config" -- "$bin" inspect --model "$data/tiny" --override-config '{"hidden_size": "wide"}'
echo "ok: --override-config"
