#!/usr/bin/env python3
"""Builds the tiny Qwen3 checkpoints the model tests compare against, with Hugging Face
transformers as the reference implementation.

For each fixture (nanovllm-models/tests/fixtures/<name>/) it writes:
  config.json, model.safetensors   a randomly initialised bf16 Qwen3ForCausalLM, saved by
                                   transformers' save_pretrained (tied embeddings: no
                                   lm_head.weight in the file);
  expected.json                    the prompts, transformers' greedy continuation of each (16
                                   tokens, model.generate with do_sample=False), the top-2
                                   logit gap of every teacher-forced position and every
                                   generated step, and per position the bf16 noise floor: the
                                   relative L2 distance between transformers' bf16 logits and
                                   the same weights run in float32;
  expected_logits/logits.safetensors
                                   the teacher-forced logits of every prompt position, tensor
                                   `logits.<prompt index>` of shape [len, vocab], and the logits
                                   of each greedy step, `greedy_logits.<prompt index>` of shape
                                   [16, vocab] (step j saw the prompt and greedy[..j]), in bf16
                                   exactly as transformers computed them (kept out of
                                   expected.json to
                                   keep the fixture small; a sub-folder so that the model folder
                                   holds only the checkpoint).

Initialisation: transformers' own (normal(0, initializer_range) for linear and embedding
weights) under torch.manual_seed(0), with initializer_range 0.1 so that the logits of a
64-wide model are spread enough for greedy decoding to be decided by the weights rather than by
rounding; then every RMSNorm weight (the layer norms, the final norm and the q/k norms) is set
to 1 + 0.2 * normal, so that a norm loaded into the wrong place or skipped changes the output.

Usage (any Python with torch, transformers and safetensors):
  python3 scripts/make_tiny_qwen3.py [--out nanovllm-models/tests/fixtures]
"""

import argparse
import copy
import json
import os

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

PROMPT_LENS = [5, 17, 40]
NEW_TOKENS = 16

COMMON = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    initializer_range=0.1,
    attention_bias=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)

FIXTURES = {
    # GQA group 2, tied embeddings (as Qwen3-0.6B).
    "tiny-qwen3": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # GQA group 4, separate lm_head.weight (as Qwen3-8B).
    "tiny-qwen3-untied": dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False
    ),
}


def top2_gap(logits: torch.Tensor) -> list[float]:
    """Per row: largest logit minus the second largest."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return (top[..., 0] - top[..., 1]).tolist()


def build(name: str, overrides: dict, out_dir: str) -> None:
    torch.manual_seed(0)
    config = Qwen3Config(**COMMON, **overrides)
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model = model.to(torch.bfloat16).eval()
    # The same bf16 weights computed in float32: the reference for the bf16 noise floor.
    model32 = copy.deepcopy(model).float()

    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)

    gen = torch.Generator().manual_seed(1234)
    prompts = [
        torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS
    ]
    logits_out = {}
    cases = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            logits = model(ids).logits[0]  # [len, vocab], bf16
            exact = model32(ids).logits[0]
            noise = (logits.float() - exact).norm(dim=-1) / exact.norm(dim=-1)
            logits_out[f"logits.{i}"] = logits.to(torch.bfloat16).contiguous()
            gcfg = GenerationConfig(
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
            res = model.generate(ids, generation_config=gcfg)
            greedy = res.sequences[0, len(prompt):].tolist()
            assert len(greedy) == NEW_TOKENS, greedy
            step_logits = torch.cat(list(res.logits), dim=0)  # [NEW_TOKENS, vocab]
            logits_out[f"greedy_logits.{i}"] = step_logits.to(torch.bfloat16).contiguous()
            cases.append(
                dict(
                    prompt=prompt,
                    prefill_top2_gap=top2_gap(logits),
                    prefill_bf16_noise=noise.tolist(),
                    greedy=greedy,
                    greedy_top2_gap=top2_gap(step_logits),
                )
            )

    logits_dir = os.path.join(path, "expected_logits")
    os.makedirs(logits_dir, exist_ok=True)
    save_file(logits_out, os.path.join(logits_dir, "logits.safetensors"))
    expected = dict(
        transformers_version=__import__("transformers").__version__,
        torch_version=torch.__version__,
        attn_implementation="eager",
        dtype="bfloat16",
        logits_file="expected_logits/logits.safetensors",
        cases=cases,
    )
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"{path}: {sum(p.numel() for p in model.parameters())} parameters")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(here, "..", "nanovllm-models", "tests", "fixtures")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=default, help="fixtures folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, overrides in FIXTURES.items():
        build(name, overrides, args.out)


if __name__ == "__main__":
    main()
