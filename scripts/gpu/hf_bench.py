#!/usr/bin/env python3
"""HF transformers' throughput on a slice of the bench.py workload (run on a GPU machine).

Usage: hf_bench.py MODEL_DIR NUM_SEQS MAX_NEW_TOKENS
The prompts are the first NUM_SEQS of bench.py's (Python's random.seed(0), as bench.py draws
them; `nanovllm bench --num-seqs N` uses the same ones).
Uses transformers' continuous-batching API (`generate_batch`, paged sdpa) when this version has
it, else padded batched `generate`. Every request generates exactly MAX_NEW_TOKENS tokens
(temperature 0.6, EOS ignored). Prints one JSON line with the throughput.
"""
import json
import random
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


def main():
    path, n, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
               for _ in range(256)][:n]
    cfg = GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=max_new, do_sample=True, temperature=0.6,
        top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
    )
    api = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda().eval()
        if hasattr(model, "generate_batch"):
            cfg.num_blocks = 4096
            cfg.block_size = 256
            cfg.max_batch_tokens = 8192
            model.generate_batch(inputs=prompts[:2], generation_config=cfg)  # warm-up
            torch.cuda.synchronize()
            t = time.time()
            out = model.generate_batch(inputs=prompts, generation_config=cfg)
            torch.cuda.synchronize()
            secs = time.time() - t
            tokens = sum(len(r.generated_tokens) for r in out.values())
            api = "generate_batch (continuous batching, paged sdpa)"
    except Exception as e:  # older or different API: fall back to padded generate
        print(f"continuous batching unavailable: {e!r}", file=sys.stderr)
    if api is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.cuda(), mask.cuda()
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], generation_config=cfg)
        torch.cuda.synchronize()
        t = time.time()
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)
        torch.cuda.synchronize()
        secs = time.time() - t
        tokens = (out.shape[1] - width) * len(prompts)
        api = "generate (padded batch, sdpa)"
    print(json.dumps({"api": api, "num_seqs": len(prompts), "output_tokens": tokens,
                      "seconds": secs, "output_tokens_per_second": tokens / secs}))


if __name__ == "__main__":
    main()
