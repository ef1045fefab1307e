"""Generation throughput: our KV-cache generator against transformers' `generate`, same model,
prompts, batch and greedy decoding, in one process each after a warm-up run.

Both decode greedily, so they produce the same tokens (tests/test_generation.py checks this) and
tokens/s compare like for like. transformers gets the same left-padded batch.

    python benchmarks/generate_throughput.py                      # SmolLM2-135M, fp32, CPU
    python benchmarks/generate_throughput.py --batches 1 8 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = [
    "the sea",
    "a detective's method",
    "beetles",
    "a country ball",
    "earthquakes",
    "letters",
    "tea",
    "Kent",
]


def conversations(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})."}]
        for i in range(n)
    ]


def run_ours(model_path: str, batch: int, new_tokens: int) -> dict:
    from persllm_jax import load_pretrained
    from persllm_jax.inference.generation import Generator, SamplingParams

    model, tokenizer = load_pretrained(model_path)
    gen = Generator(model, tokenizer, max_batch=batch)
    params = SamplingParams(max_new_tokens=new_tokens)
    gen.chat(conversations(batch), params)  # compile
    t0 = time.perf_counter()
    out = gen.chat(conversations(batch), params)
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(c.token_ids) for c in out), "seconds": seconds}


def run_transformers(model_path: str, batch: int, new_tokens: int) -> dict:
    import torch
    import transformers

    path = Path(model_path)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    src = path.parent if path.suffix == ".gguf" else path
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, **kwargs)
    tokenizer.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs).eval()
    texts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations(batch)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate():
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = ids[:, enc["input_ids"].shape[1] :]
        eos = tokenizer.eos_token_id
        return sum(int(((row != eos) & (row != tokenizer.pad_token_id)).sum()) for row in new)

    generate()
    t0 = time.perf_counter()
    tokens = generate()
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="HF dir or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.model:
        from persllm_jax.io.offline_models import smollm2_gguf

        args.model = str(smollm2_gguf())
    if args.worker:
        run = run_ours if args.worker == "ours" else run_transformers
        print(json.dumps(run(args.model, args.batch, args.new_tokens)))
        return
    print(f"model {Path(args.model).name}, fp32, greedy, {args.new_tokens} new tokens, warm runs")
    print("| batch | ours tokens/s | transformers tokens/s | ours / transformers |")
    print("|---|---|---|---|")
    for batch in args.batches:
        results = {}
        for worker in ("ours", "transformers"):
            cmd = [sys.executable, __file__, "--worker", worker, "--batch", str(batch), "--model", args.model]
            cmd += ["--new-tokens", str(args.new_tokens)]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            results[worker] = r["tokens"] / r["seconds"]
        ours, theirs = results["ours"], results["transformers"]
        print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
