#!/usr/bin/env bash
# CUDA graphs: decode-shaped steps recorded once per shape and replayed give the same tokens and
# the same logits, bit for bit, as launching every kernel (--enforce-eager). Four prompts of
# different lengths, at most three at a time (the fourth joins when one ends, in a mixed prefill +
# decode step that runs eagerly); 40 new tokens cross the fixtures' window rings, compressor
# windows and indexer top-k. pp 1 and, with two GPUs, pp 2 (two residual buffers per stage), and
# speculative decoding's verify steps. The run summary must show replayed steps (so the test fails if graphs
# are silently off). Exit 77 (skipped) without a GPU.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
out=$("$bin" generate --device cuda --model "$data/tiny" --prompt-ids 1,2,3 --max-tokens 1 2>&1) || {
  echo "skipped: no CUDA GPU or no CUDA backend: $out"; exit 77; }
# pp 2 needs a GPU per stage.
splits="1"
[ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ] && splits="1 2"
for m in tiny small tinyq; do
  for pp in $splits; do
    run=(generate --device cuda --model "$data/$m" --pp "$pp" --ignore-eos --max-num-seqs 3
         --prompt-ids 1,2,3,4,5 --prompt-ids 7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23
         --prompt-ids 30 --prompt-ids 40,41 --max-tokens 40)
    eager=$("$bin" "${run[@]}" --enforce-eager 2>&1) || fail "$m pp $pp eager: $eager"
    graphs=$("$bin" "${run[@]}" 2>&1) || fail "$m pp $pp graphs: $graphs"
    grep -q '^cuda graphs' <<<"$eager" && fail "$m pp $pp: --enforce-eager replayed graphs: $eager"
    replayed=$(grep '^cuda graphs' <<<"$graphs") || fail "$m pp $pp: no step replayed: $graphs"
    [ "$(hash_of "$eager")" = "$(hash_of "$graphs")" ] ||
      fail "$m pp $pp: logits differ: $(hash_of "$eager") eager, $(hash_of "$graphs") graphs"
    [ "$(grep 'output ids' <<<"$eager")" = "$(grep 'output ids' <<<"$graphs")" ] ||
      fail "$m pp $pp: tokens differ"
    echo "ok: $m pp $pp: $(hash_of "$graphs"); $replayed"
  done
done
# A larger step after a recording reallocates workspace buffers the recording points at: one
# sequence at a time, a short prompt (its decode steps recorded), then a 120-token prompt (its
# prefill grows the workspace), then short ones again: the replays after it must use the new
# buffers (the graphs are recorded again), with the same bits as eager launches.
long=$(seq -s, 2 121)
run=(generate --device cuda --model "$data/small" --ignore-eos --max-num-seqs 1 --max-tokens 12
     --prompt-ids 1,2,3 --prompt-ids "$long" --prompt-ids 4,5,6 --prompt-ids 7,8)
eager=$("$bin" "${run[@]}" --enforce-eager 2>&1) || fail "workspace growth eager: $eager"
graphs=$("$bin" "${run[@]}" 2>&1) || fail "workspace growth graphs: $graphs"
replayed=$(grep '^cuda graphs' <<<"$graphs") || fail "workspace growth: no step replayed: $graphs"
[ "$(hash_of "$eager")" = "$(hash_of "$graphs")" ] || fail "workspace growth: logits differ"
echo "ok: small, a long prompt between short ones: $(hash_of "$graphs"); $replayed"
# Speculative decoding's verify steps (chunks of 1 + 2 drafts) are replayed too.
run=(generate --device cuda --model "$data/tiny" --ignore-eos --max-num-seqs 3 --speculative mtp
     --num-speculative-tokens 2 --prompt-ids 1,2,3,4,5 --prompt-ids 7,8,9,10,11,12,13 --prompt-ids 30
     --max-tokens 40)
eager=$("$bin" "${run[@]}" --enforce-eager 2>&1) || fail "speculative eager: $eager"
graphs=$("$bin" "${run[@]}" 2>&1) || fail "speculative graphs: $graphs"
replayed=$(grep '^cuda graphs' <<<"$graphs") || fail "speculative: no step replayed: $graphs"
[ "$(hash_of "$eager")" = "$(hash_of "$graphs")" ] || fail "speculative: logits differ"
[ "$(grep 'output ids' <<<"$eager")" = "$(grep 'output ids' <<<"$graphs")" ] ||
  fail "speculative: tokens differ"
echo "ok: tiny --speculative mtp K 2: $(hash_of "$graphs"); $replayed; $(grep '^speculative' <<<"$graphs")"
