#!/usr/bin/env bash
# --speculative / --num-speculative-tokens, verify --mtp-golden, and DSpark releases: the flags'
# errors, the MTP check passing (and failing at an impossible tolerance), a DSpark config running
# as plain V4 and refused with --speculative mtp, a config without an MTP layer refused.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gen=(generate --device cpu --prompt-ids 0,5,6 --max-tokens 2)
expect_error 2 "--num-speculative-tokens needs --speculative mtp" -- "$bin" "${gen[@]}" --model "$data/tiny" --num-speculative-tokens 2
expect_error 2 "--num-speculative-tokens: expected an integer in \[1, 8\], got 9" -- "$bin" "${gen[@]}" --model "$data/tiny" --speculative mtp --num-speculative-tokens 9
expect_error 2 "--num-speculative-tokens: expected an integer in \[1, 8\], got 0" -- "$bin" "${gen[@]}" --model "$data/tiny" --speculative mtp --num-speculative-tokens 0
expect_error 2 "--speculative: expected one of none, mtp, got 'eagle'" -- "$bin" "${gen[@]}" --model "$data/tiny" --speculative eagle
out=$("$bin" "${gen[@]}" --model "$data/tiny" --speculative mtp --num-speculative-tokens 3 --pp 2) || fail "generate --speculative mtp --pp 2: $out"
grep -q "MTP draft layer loaded on the last stage" <<<"$out" || fail "no MTP load line: $out"

# verify --mtp-golden: passes at the default tolerance, exit 1 at an impossible one, exit 2 for a
# file that is not an MTP golden.
m=$data/tiny
out=$("$bin" verify --device cpu --model "$m" --golden "$m/golden.safetensors" --mtp-golden "$m/mtp_golden.safetensors" --max-num-batched-tokens 21) || fail "verify --mtp-golden: $out"
grep -q "mtp verify: PASS" <<<"$out" || fail "no MTP PASS: $out"
[ "$(grep -c '^mtp prompt' <<<"$out")" = 3 ] || fail "expected 3 MTP prompt lines: $out"
expect_error 1 "" -- "$bin" verify --device cpu --model "$m" --golden "$m/golden.safetensors" --mtp-golden "$m/mtp_golden.safetensors" --atol 1e-9
expect_error 2 "MTP golden file: tensor p0.mtp_logits is missing" -- "$bin" verify --device cpu --model "$m" --golden "$m/golden.safetensors" --mtp-golden "$m/golden.safetensors"

# golden --mtp-out writes the MTP layer's logits in the fixtures' format (from a 2-stage golden run);
# verify --mtp-golden reproduces them exactly, in one step and one position per prompt per step.
"$bin" golden --device cpu --model "$m" --prompt-ids 0,5,6,7 --prompt-ids 0,9 --max-tokens 5 --pp 2 \
  --out "$tmp/g.safetensors" --mtp-out "$tmp/m.safetensors" >/dev/null || fail "golden --mtp-out"
for budget in 2048 2; do
  out=$("$bin" verify --device cpu --model "$m" --golden "$tmp/g.safetensors" --mtp-golden "$tmp/m.safetensors" --max-num-batched-tokens $budget) || fail "verify of golden --mtp-out: $out"
  [ "$(grep -c 'mtp_logits max_abs_err 0.000e+00' <<<"$out")" = 2 ] || fail "MTP logits differ from golden --mtp-out (budget $budget): $out"
done
expect_error 2 "MTP golden file: p0.mtp_logits is F32 \[8, 256\]; expected F32 \[28, 256\]" -- "$bin" verify --device cpu --model "$m" --golden "$m/golden.safetensors" --mtp-golden "$tmp/m.safetensors"

# inspect: the mtp.* tensors are marked ignored without --speculative mtp and counted with it.
"$bin" inspect --model "$m" | grep -q "mtp.0.e_proj.weight .*(ignored)" || fail "inspect does not mark mtp.* ignored"
"$bin" inspect --model "$m" --speculative mtp | grep -q "mtp layer (mtp.0.\*)" || fail "inspect --speculative mtp lacks the MTP layer"

# A DSpark release: small's config with dspark_* keys and three draft entries in compress_ratios.
mkdir -p "$tmp/dspark" "$tmp/nomtp"
python3 - "$data/small/config.json" "$tmp" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
d = dict(c, dspark_block_size=4, dspark_target_layer_ids=[1, 3, 5], dspark_noise_token_id=2)
d["compress_ratios"] = c["compress_ratios"] + [0, 0]
json.dump(d, open(sys.argv[2] + "/dspark/config.json", "w"))
json.dump(dict(c, num_nextn_predict_layers=0), open(sys.argv[2] + "/nomtp/config.json", "w"))
PY
out=$("$bin" "${gen[@]}" --model "$tmp/dspark" --load-format dummy) || fail "DSpark config as plain V4: $out"
"$bin" inspect --model "$tmp/dspark" --load-format dummy | grep -q "draft module: DSpark" || fail "inspect does not name DSpark"
expect_error 2 "DSpark draft module not supported; run without --speculative" -- "$bin" "${gen[@]}" --model "$tmp/dspark" --load-format dummy --speculative mtp
expect_error 2 "num_nextn_predict_layers 0 .*no MTP layer" -- "$bin" "${gen[@]}" --model "$tmp/nomtp" --load-format dummy --speculative mtp
expect_error 2 "DSpark draft module not supported" -- "$bin" golden --device cpu --model "$tmp/dspark" --load-format dummy --prompt-ids 0,5 --out "$tmp/x" --mtp-out "$tmp/y"
echo "all speculative CLI checks passed"
