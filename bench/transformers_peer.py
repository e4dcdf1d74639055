#!/usr/bin/env python3
"""The peer of seekpipe_bench_model: Hugging Face transformers' DeepseekV4ForCausalLM on the same
dimensions, random bf16 weights (transformers has no FP4 expert path; its FP8 path is not used
either), on one GPU. B sequences are prefilled to the context with the cache on, then decode steps
of B tokens each are timed (median), as seekpipe_bench_model does.

  python3 bench/transformers_peer.py tests/data/configs/deepseek-v4-flash --layers 4 \
      --batch 1,32 --context 512 --decode-steps 8
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config_dir")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=8)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.config_dir, "config.json")))
    n = cfg["num_hidden_layers"]
    if a.layers < n:  # keep the first layers' kinds and the draft module's trailing entry
        ratios = cfg["compress_ratios"]
        cfg["compress_ratios"] = ratios[:a.layers] + ratios[n:]
        cfg["num_hidden_layers"] = a.layers
    cfg.pop("quantization_config", None)
    cfg.pop("expert_dtype", None)
    config = DeepseekV4Config(**cfg)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.time()
    with torch.device("cuda"):
        model = DeepseekV4ForCausalLM(config).eval()
    torch.cuda.synchronize()
    params = sum(p.numel() for p in model.parameters())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}: {a.layers} layers, {params / 1e9:.2f} G parameters "
          f"(bf16) built in {time.time() - t0:.1f} s", flush=True)
    print(f"{'batch':>6} {'context':>8} {'decode ms/step':>15} {'decode tok/s':>13} {'prefill tok/s':>14}")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(0, config.vocab_size, (b, a.context), device="cuda", generator=gen)
        with torch.no_grad():
            torch.cuda.synchronize()
            t = time.time()
            out = model(input_ids=ids, use_cache=True)
            torch.cuda.synchronize()
            prefill = time.time() - t
            pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            for _ in range(a.decode_steps):
                torch.cuda.synchronize()
                t = time.time()
                out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                steps.append(time.time() - t)
                pkv = out.past_key_values
        med = statistics.median(steps)
        print(f"{b:>6} {a.context:>8} {med * 1e3:>15.3f} {b / med:>13.1f} {b * a.context / prefill:>14.1f}",
              flush=True)
        del out, pkv
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
