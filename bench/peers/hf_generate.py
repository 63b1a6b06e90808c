#!/usr/bin/env python3
"""Peer benchmark: Hugging Face transformers on the same model and workload.

Called by `module01_baseline bench --peer ...` with the same prompt length,
output length, batch sizes, device and dtype as our own run. Each variant
is one way people run a model with transformers:

  generate  `model.generate` with its default (dynamic) KV cache
  loop      a hand-written greedy loop: one forward per token, passing the
            cache back in (what `generate` does, without its bookkeeping)
  compiled  `generate` with `cache_implementation="static"`: a preallocated
            cache, and the decode step compiled by torch.compile and replayed
            as CUDA graphs (transformers does both for a static cache). The
            first calls for each batch size compile; they are not timed.

Prints one JSON object on the last line of stdout, {"peers": [...]}, one
entry per variant with the fields of our `PeerResult`. Prompts are random
token ids (seeded), decoding is greedy with a fixed number of new tokens,
and every timed region ends with a device sync.
"""
import argparse
import json
import os
import statistics
import sys
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
    ap.add_argument("--variants", default="generate", help="comma-separated: generate, loop, compiled")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load(args)
    gen = torch.Generator().manual_seed(args.seed)
    low = min(100, args.vocab // 2)

    def prompts(batch):
        return torch.randint(low, args.vocab, (batch, args.prompt_len), generator=gen).to(args.device)

    def generate(ids, **extra):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                              min_new_tokens=args.output_len, do_sample=False, pad_token_id=0, **extra)

    def loop(ids):
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(args.output_len - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, 1)

    variants = {
        "generate": ("hf-generate", generate, 1),
        "loop": ("hf-loop", loop, 1),
        "compiled": ("hf-compiled", lambda ids: generate(ids, cache_implementation="static"), 2),
    }
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    peers = []
    for variant in args.variants.split(","):
        name, run, warm_ups = variants[variant]
        compile_s = 0.0

        def measure(batch, repeats=1):
            """Prefill and whole-run seconds, and seconds per token after the
            first: each the median of `repeats` timings."""
            nonlocal compile_s
            ids = prompts(batch)
            for _ in range(warm_ups):  # first calls: allocator, kernel choice, compilation
                _, seconds = timed(args.device, lambda: run(ids))
                compile_s += seconds
            steps = max(args.output_len - 1, 1)
            runs = []
            for _ in range(repeats):
                _, prefill = timed(args.device, lambda: model(ids, use_cache=True))
                _, total = timed(args.device, lambda: run(ids))
                runs.append((prefill, total, (total - prefill) / steps))
            return tuple(statistics.median_low(r[i] for r in runs) for i in range(3))

        # The single request is timed three times, as ours is (five times on
        # a GPU): one timing of a prefill moves by half from run to run.
        prefill, total, per_token = measure(1, repeats=3)
        single = {"prefill_ms": prefill * 1e3, "decode_ms_per_token": per_token * 1e3,
                  "end_to_end_ms": total * 1e3}
        batches = []
        for b in sizes:
            prefill, total, per_token = measure(b)
            batches.append({"batch": b, "wall_s": total, "output_tokens_per_s": b * args.output_len / total,
                            "mean_ttft_ms": prefill * 1e3, "mean_itl_ms": per_token * 1e3})
        print(f"{name}: warm-up and compilation {compile_s:.1f} s", file=sys.stderr, flush=True)
        peers.append({"name": name, "single": single, "batches": batches})
    print(json.dumps({"peers": peers}))


if __name__ == "__main__":
    main()
