#!/usr/bin/env python3
"""Peer benchmark: Hugging Face transformers on the same model and workload.

Called by `module01_baseline bench --peer hf` with the same prompt length,
output length, batch sizes, device and dtype as our own run; prints one JSON
object on the last line of stdout with the fields of our `PeerResult`:

  {"name": "hf-generate", "single": {...}, "batches": [...]}

Prompts are random token ids (seeded), decoding is greedy with a fixed
number of new tokens, and every timed region ends with a device sync.
"""
import argparse
import json
import os
import time

import torch


def load(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    if args.config_json:
        cfg = json.loads(args.config_json)
        torch.manual_seed(args.seed)
        config = LlamaConfig(**{k: v for k, v in cfg.items() if v is not None})
        with torch.device(args.device):
            model = LlamaForCausalLM(config).to(dtype)
    elif args.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(args.model))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(args.device).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=".gguf file or Hugging Face directory")
    ap.add_argument("--config-json", help="LlamaConfig as JSON: random weights of that shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--prompt-len", type=int, required=True)
    ap.add_argument("--output-len", type=int, required=True)
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load(args)
    gen = torch.Generator().manual_seed(args.seed)
    low = min(100, args.vocab // 2)

    def prompts(batch):
        return torch.randint(low, args.vocab, (batch, args.prompt_len), generator=gen).to(args.device)

    def generate(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                              min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)

    generate(prompts(1))  # warm-up

    def measure(batch):
        ids = prompts(batch)
        _, prefill = timed(args.device, lambda: model(ids, use_cache=True))
        _, total = timed(args.device, lambda: generate(ids))
        steps = max(args.output_len - 1, 1)
        return prefill, total, (total - prefill) / steps

    prefill, total, per_token = measure(1)
    single = {"prefill_ms": prefill * 1e3, "decode_ms_per_token": per_token * 1e3, "end_to_end_ms": total * 1e3}
    batches = []
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        prefill, total, per_token = measure(b)
        batches.append({"batch": b, "wall_s": total, "output_tokens_per_s": b * args.output_len / total,
                        "mean_ttft_ms": prefill * 1e3, "mean_itl_ms": per_token * 1e3})
    print(json.dumps({"name": "hf-generate", "single": single, "batches": batches}))


if __name__ == "__main__":
    main()
