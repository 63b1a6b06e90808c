"""Writes a Hugging Face Llama directory with seeded random weights.

GPU runs need a model of a realistic size, and a GPU machine without
internet access has none: this script makes one there from a tokenizer
directory (tokenizer.json, and optionally tokenizer_config.json and
chat_template.jinja). The weights are random, so the text is noise, but
every shape, byte count and kernel is that of the real model — which is
all a timing or a KV transfer measures.

    python3 scripts/random_hf_model.py --tokenizer DIR --out DIR [--preset tinyllama-1.1b]
"""

import argparse
import json
import pathlib
import shutil

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

# Hidden size, MLP size, layers, heads, KV heads, context: the published shapes.
PRESETS = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 8192),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 2048),
    "llama3-8b": (4096, 14336, 32, 32, 8, 8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    hidden, mlp, layers, heads, kv_heads, context = PRESETS[args.preset]
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(args.out), "preset": args.preset, "parameters": params}))


if __name__ == "__main__":
    main()
