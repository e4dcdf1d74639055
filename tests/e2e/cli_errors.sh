#!/usr/bin/env bash
# User mistakes on the command line get a clear error (exit 2) and never a crash.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
expect_error 2 "outside the vocabulary; expected 0 <= id < 256" -- "$bin" generate --model "$data/tiny" --prompt-ids 1,2,999
expect_error 2 "--prompt-ids is required" -- "$bin" generate --model "$data/tiny"
expect_error 2 "--model is required" -- "$bin" generate --prompt-ids 1
expect_error 2 "--max-num-seqs: expected an integer in \[1" -- "$bin" generate --model "$data/tiny" --prompt-ids 1 --max-num-seqs 0
expect_error 2 "unknown flag --max-token" -- "$bin" generate --model "$data/tiny" --prompt-ids 1 --max-token 3
expect_error 2 "--load-format: expected one of auto, safetensors, dummy" -- "$bin" generate --model "$data/tiny" --prompt-ids 1 --load-format gguf
expect_error 2 "exceed --max-model-len 4" -- "$bin" generate --model "$data/tiny" --prompt-ids 1,2,3,4,5 --max-model-len 4
expect_error 2 "cannot open .*config.json" -- "$bin" inspect --model "$data/does-not-exist"
expect_error 2 "unknown command 'serve'" -- "$bin" serve
expect_error 2 "golden file has no prompts|cannot open" -- "$bin" verify --model "$data/tiny" --golden "$data/tiny/model.safetensors"
expect_error 2 "stage 0 needs .* of sequence state|stage 0 needs .*--max-model-len 1000000000" -- "$bin" generate --model "$data/tiny" --prompt-ids 1,2 --max-model-len 1000000000 --max-num-seqs 64
expect_error 2 "stage [01] needs .*dummy weights" -- "$bin" generate --model "$data/configs/deepseek-v4-flash" --load-format dummy --prompt-ids 1,2 --max-model-len 1024 --pp 2
# A verify that misses the tolerance fails with exit 1.
expect_error 1 "" -- "$bin" verify --model "$data/tiny" --golden "$data/tiny/golden.safetensors" --atol 1e-9
"$bin" generate --help | grep -q -- "--max-num-batched-tokens" || fail "--help lacks flags"
"$bin" inspect --model "$data/small" | grep -q "layers.5.attn.indexer.wq_b.weight" || fail "inspect lacks the tensor table"
echo "all CLI error checks passed"
