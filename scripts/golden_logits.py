#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers, for shared/tests/golden.rs.

Run once (by a developer, not by CI) after converting the GGUF model to a
Hugging Face directory with our own converter:

    cargo run --release -p module01_baseline -- convert --out /tmp/smollm2-hf
    .venv/bin/python scripts/golden_logits.py --hf-dir /tmp/smollm2-hf \
        --gguf "$SPARK_DISAGG_MODEL" --out shared/tests/fixtures

It writes
  smollm2_golden.safetensors  logits [positions, vocab] (f32) for the prompt
  smollm2_golden.json         prompt ids, 16 greedy tokens, tokenizer cases,
                              a rendered chat template

Two independent references are compared before anything is written:
transformers on our converted directory, and transformers reading the GGUF
file itself (its own dequantisation, Q/K un-permutation and tokenizer
conversion). If they disagree, our converter is wrong and the script stops.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The capital of France is"
GREEDY_STEPS = 16
TOKENIZER_CASES = [
    "Hello, world!",
    "The year 2024 had 366 days.",
    "  leading spaces and\nnew lines\tand tabs",
    "<|im_start|>user\nHi there<|im_end|>",
    "naïve café – 東京 🚀",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def run(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        out = model.generate(ids, max_new_tokens=GREEDY_STEPS, do_sample=False,
                             eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    return ids[0].tolist(), logits, out[0, ids.shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="directory written by `module01_baseline convert`")
    ap.add_argument("--gguf", required=True, help="the original GGUF file, for the cross-check")
    ap.add_argument("--out", required=True, help="fixture directory")
    args = ap.parse_args()
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    prompt_ids, logits, greedy = run(model, tok)
    print("prompt ids:", prompt_ids)
    print("greedy:", greedy, repr(tok.decode(greedy)))

    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    ref_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    ref_ids, ref_logits, ref_greedy = run(ref_model, ref_tok)
    diff = (logits - ref_logits).abs().max().item()
    print(f"converted dir vs transformers' own GGUF loader: max |Δlogit| = {diff:.2e}")
    assert ref_ids == prompt_ids, (ref_ids, prompt_ids)
    assert ref_greedy == greedy, (ref_greedy, greedy)
    assert diff < 1e-3, diff

    cases = []
    for text in TOKENIZER_CASES:
        ids = tok(text, add_special_tokens=True).input_ids
        assert ids == ref_tok(text, add_special_tokens=True).input_ids, text
        cases.append({"text": text, "ids": ids})
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)

    os.makedirs(args.out, exist_ok=True)
    save_file({"logits": logits.contiguous()}, os.path.join(args.out, "smollm2_golden.safetensors"))
    with open(os.path.join(args.out, "smollm2_golden.json"), "w") as f:
        json.dump({
            "source": "transformers " + __import__("transformers").__version__
                      + " on the HF directory converted from SmolLM2-135M-Instruct.Q4_1.gguf, float32, CPU",
            "prompt": PROMPT,
            "prompt_ids": prompt_ids,
            "greedy_tokens": greedy,
            "greedy_text": tok.decode(greedy),
            "tokenizer_cases": cases,
            "chat_messages": CHAT,
            "chat_text": chat_text,
        }, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
