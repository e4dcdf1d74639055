#!/usr/bin/env bash
# User mistakes on the command line get a clear error (exit 2) and never a crash.
. "$(dirname "$0")/lib.sh"
bin=$1 data=$2
expect_error 2 "outside the vocabulary; expected 0 <= id < 256" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1,2,999
expect_error 2 "--prompt-ids is required" -- "$bin" generate --device cpu --model "$data/tiny"
expect_error 2 "--model is required" -- "$bin" generate --device cpu --prompt-ids 1
expect_error 2 "--max-num-seqs: expected an integer in \[1" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --max-num-seqs 0
expect_error 2 "unknown flag --max-token" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --max-token 3
expect_error 2 "--load-format: expected one of auto, safetensors, dummy" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --load-format gguf
expect_error 2 "exceed --max-model-len 4" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1,2,3,4,5 --max-model-len 4
expect_error 2 "cannot open .*config.json" -- "$bin" inspect --model "$data/does-not-exist"
expect_error 2 "unknown command 'frobnicate'" -- "$bin" frobnicate
expect_error 2 "--model is required" -- "$bin" serve
expect_error 2 "--port: " -- "$bin" serve --model "$data/tiny" --port 70000
expect_error 2 "golden file has no prompts|cannot open" -- "$bin" verify --device cpu --model "$data/tiny" --golden "$data/tiny/model.safetensors"
expect_error 2 "stage 0 needs .* of sequence state|stage 0 needs .*--max-model-len 1000000000" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1,2 --max-model-len 1000000000 --max-num-seqs 64
expect_error 2 "the 2 stages of this process need .* in total .*dummy weights.*split the layers over more stages" -- "$bin" generate --device cpu --model "$data/configs/deepseek-v4-flash" --load-format dummy --prompt-ids 1,2 --max-model-len 1024 --pp 2
expect_error 2 "--device: expected one of auto, cpu, cuda" -- "$bin" generate --device tpu --model "$data/tiny" --prompt-ids 1
# Without a GPU (CI), asking for one is an error that says so, not a silent fall-back to the CPU.
if ! nvidia-smi -L >/dev/null 2>&1; then
  expect_error 2 "--device cuda: (this seekpipe was built without|no usable CUDA GPU)" -- "$bin" generate --device cuda --model "$data/tiny" --prompt-ids 1
fi
expect_error 2 "--kv-cache-dtype fp8: not supported yet" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --kv-cache-dtype fp8
expect_error 2 "--kv-cache-dtype bf16: the CPU backend keeps its state in fp32" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --kv-cache-dtype bf16
expect_error 2 "--activation-quant fp8: the CPU backend computes in fp32" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --activation-quant fp8
# GPU placement and the stage transport: every mistake named, also on a machine without a GPU.
expect_error 2 "--devices 0,1: GPU placement is for --device cuda" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --devices 0,1
expect_error 2 "--devices '0,0': GPU 0 is listed twice" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --devices 0,0
expect_error 2 "--devices '0,x': expected GPU ordinals" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --devices 0,x
expect_error 2 "--devices '-1': expected GPU ordinals" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --devices=-1
expect_error 2 "--stage-transport: expected one of auto, nccl, host" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --stage-transport ib
expect_error 2 "--stage-transport nccl: the boundary tensor goes device to device only between GPU stages" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --stage-transport nccl
expect_error 2 "--fault-inject 0:1:cuda: a CUDA fault needs --device cuda" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --fault-inject 0:1:cuda
expect_error 2 "--fault-inject 0:1:nccl: an NCCL fault needs the NCCL stage transport" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --pp 2 --fault-inject 0:1:nccl
expect_error 2 "--fault-inject '0:1:gpu': expected STAGE:STEP or STAGE:STEP:kill\|error\|stall\|cuda\|nccl" -- "$bin" generate --device cpu --model "$data/tiny" --prompt-ids 1 --fault-inject 0:1:gpu
# A verify that misses the tolerance fails with exit 1.
expect_error 1 "" -- "$bin" verify --device cpu --model "$data/tiny" --golden "$data/tiny/golden.safetensors" --atol 1e-9
"$bin" generate --device cpu --help | grep -q -- "--max-num-batched-tokens" || fail "--help lacks flags"
"$bin" inspect --model "$data/small" | grep -q "layers.5.attn.indexer.wq_b.weight" || fail "inspect lacks the tensor table"
echo "all CLI error checks passed"
