"""Generation throughput on persona prompts: our continuous-batching generator against
transformers, same model (fp32), prompts and greedy decoding, in one run.

1. `generate`: N persona prompts of mixed lengths at once (batch 1, 8, 16, 64): our `Generator`
   against transformers' `generate` on the same left-padded batch, and our `Generator` with its
   layers unrolled over a per-layer copy of the weights (`unroll_layers=True`); each in its own
   process, timed after a warm-up run.
2. `serve`: N concurrent streaming requests (16, 64) to `persllm serve` against `transformers serve
   --continuous-batching`, each in turn on this machine: completion tokens/s over the wall time
   of the flood, and the mean and worst time to first token.
3. `arrival`: time to first token of one request sent while 8 long generations run, on each server.

Greedy decoding on both sides produces the same tokens (tests/test_continuous_batching.py checks
this), so tokens/s compare like for like.

    python benchmarks/generate_throughput.py                     # SmolLM2-135M-Instruct, fp32, CPU
    python benchmarks/generate_throughput.py --parts generate --batches 1 8 16 64 --new-tokens 64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Hi.",
    "What do you do in the mornings?",
    "Tell me about the people you trust most, and why you trust them.",
    "What is the best thing about your work?",
    "If you had to explain your method to a child who had never met you, what would you say first?",
    "Where were you born?",
    "Which of your habits would surprise a stranger, and which would your oldest friend name first?",
    "What are you afraid of?",
]


def conversations(n: int, run: int = 0) -> list[list[dict]]:
    """n persona conversations: the three example personas at both stages, questions of mixed
    lengths (so prompts range from about 60 to about 130 tokens). Each `run` numbers its questions
    apart, so a run shares only the persona prompts with the runs before it, not whole prompts."""
    from persllm_jax.personas.materials import load_personas
    from persllm_jax.personas.prompts import persona_conversation

    pairs = [(p, s) for p in load_personas(ROOT / "examples" / "personas") for s in p.stages]
    return [
        persona_conversation(*pairs[i % len(pairs)], f"{QUESTIONS[i % len(QUESTIONS)]} (question {run}-{i})")
        for i in range(n)
    ]


# -- 1. batch generation ---------------------------------------------------------------------------


def run_ours(model_path: str, batch: int, new_tokens: int, unroll_layers: bool = False) -> dict:
    from persllm_jax import load_pretrained
    from persllm_jax.inference.generation import Generator, SamplingParams

    model, tokenizer = load_pretrained(model_path)
    gen = Generator(model, tokenizer, max_batch=batch, unroll_layers=unroll_layers)
    params = SamplingParams(max_new_tokens=new_tokens)
    # compile: a run with a cold cache, then one that finds the persona prompts cached (its
    # prefill shapes are those of the timed run)
    gen.chat(conversations(batch, run=1), params)
    gen.chat(conversations(batch, run=2), params)
    calls = []  # (new tokens per row, seconds) of each model call of the timed run
    run_call = gen.scheduler.run_call

    def timed(call, greedy_only, keep_logits):
        t0 = time.perf_counter()
        out = run_call(call, greedy_only, keep_logits)
        calls.append((call.ids.shape[1], time.perf_counter() - t0))
        return out

    gen.scheduler.run_call = timed
    t0 = time.perf_counter()
    out = gen.chat(conversations(batch, run=3), params)
    seconds = time.perf_counter() - t0
    decode = [s for t, s in calls if t == 1]
    return {
        "tokens": sum(len(c.token_ids) for c in out),
        "seconds": seconds,
        "decode_calls": len(decode),
        "decode_seconds": sum(decode),
        "weights_only_step": weights_only_step(gen, batch),
    }


def weights_only_step(gen, batch: int) -> float:
    """Median seconds of a decode call over `batch` rows with nothing cached: what a decode step
    costs beyond reading the cached keys and values (the weights, the head, the sampler, the cache
    write)."""
    from persllm_jax.inference.paged_forward import SCRATCH_PAGE
    from persllm_jax.inference.sampling import SamplingParams
    from persllm_jax.inference.scheduler import CallRows

    rows = np.arange(batch, dtype=np.int32)
    call = CallRows(
        ids=np.full((batch, 1), 1, np.int32),
        positions=np.zeros((batch, 1), np.int32),
        valid=np.ones((batch, 1), bool),
        pages=np.full((batch, 2), SCRATCH_PAGE, np.int32),  # written to the scratch page
        cached_pages=np.zeros((batch, 0), np.int32),
        last=np.zeros((batch,), np.int32),
        slots=rows,
        emits=np.zeros((batch,), bool),
        drawn=np.zeros((batch,), np.int32),
        params=[SamplingParams()] * batch,
    )
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        gen._run_call(call, True, False)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def transformers_batch(model_path: str, batch: int):
    """transformers' tokenizer and fp32 model, the batch's prompts encoded left-padded as
    `generate` takes them, and the ids that end a reply."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in conversations(batch, run=3)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    end = {tokenizer.eos_token_id, tokenizer.pad_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])}
    return tokenizer, model, enc, end


def run_transformers(model_path: str, batch: int, new_tokens: int) -> dict:
    import torch

    tokenizer, model, enc, end = transformers_batch(model_path, batch)

    def generate():
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = ids[:, enc["input_ids"].shape[1] :].tolist()
        return sum(next((k for k, t in enumerate(row) if t in end), len(row)) for row in new)

    generate()
    t0 = time.perf_counter()
    tokens = generate()
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def rate_and_step(measured: dict) -> tuple[float, float]:
    """Tokens/s of one of our timed runs, and its mean decode step in ms."""
    step_ms = 1e3 * measured["decode_seconds"] / max(measured["decode_calls"], 1)
    return measured["tokens"] / measured["seconds"], step_ms


def batch_table(model_dir: str, batches: list[int], new_tokens: int) -> list[dict]:
    print(f"\n## generate: a batch of persona prompts, greedy, {new_tokens} new tokens, warm runs")
    print(
        "| batch | ours tokens/s | transformers `generate` tokens/s | ours / transformers "
        "| decode steps: ms each / with nothing cached | bound: ours with cached keys read free "
        "| ours, layers unrolled: tokens/s, decode ms / with nothing cached |"
    )
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for batch in batches:
        results = {}
        for worker in ("ours", "transformers", "ours_unrolled"):
            cmd = [sys.executable, __file__, "--worker", worker, "--batch", str(batch), "--model", model_dir]
            cmd += ["--new-tokens", str(new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
            r = json.loads(out.splitlines()[-1])
            results[worker] = r
        mine, theirs = results["ours"], results["transformers"]["tokens"] / results["transformers"]["seconds"]
        ours, step_ms = rate_and_step(mine)
        # the same run with every decode step at the cost of a full-batch step with nothing cached
        # (the weights read once a step): what the run would take if reading the cached keys
        # cost nothing
        free = mine["seconds"] - mine["decode_seconds"] + mine["decode_calls"] * mine["weights_only_step"]
        bound = mine["tokens"] / free
        unrolled = results["ours_unrolled"]
        unrolled_tok_s, unrolled_step_ms = rate_and_step(unrolled)
        rows.append(
            {
                "batch": batch,
                "ours_tok_s": ours,
                "transformers_tok_s": theirs,
                "ours": mine,
                "bound_tok_s": bound,
                "ours_unrolled": unrolled,
            }
        )
        print(
            f"| {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x "
            f"| {step_ms:.1f} / {1e3 * mine['weights_only_step']:.1f} | {bound:.1f} ({bound / theirs:.2f}x) "
            f"| {unrolled_tok_s:.1f} ({unrolled_tok_s / theirs:.2f}x), {unrolled_step_ms:.1f} / "
            f"{1e3 * unrolled['weights_only_step']:.1f} |",
            flush=True,
        )
    return rows


# -- 2. and 3. servers -------------------------------------------------------------------------------


def stream_one(base_url: str, model: str, conversation: list[dict], max_tokens: int) -> dict:
    """One streaming greedy request: its time to first content, its completion tokens, its end."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=1800)
    t0 = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=conversation,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if first is None:
                first = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return {"ttft": first, "tokens": usage if usage is not None else pieces, "end": time.perf_counter()}


def flood(base_url: str, model: str, n: int, new_tokens: int) -> dict:
    """n concurrent requests, timed on the second of two floods (the first, with other questions,
    lets a compiling server compile what a flood of this size meets)."""

    def one_flood(run: int) -> dict:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            results = list(
                pool.map(lambda c: stream_one(base_url, model, c, new_tokens), conversations(n, run))
            )
        seconds = max(r["end"] for r in results) - t0
        ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
        return {
            "tok_s": sum(r["tokens"] for r in results) / seconds,
            "ttft_mean": sum(ttfts) / len(ttfts),
            "ttft_max": max(ttfts),
        }

    one_flood(run=1)
    return one_flood(run=2)


def arrival(base_url: str, model: str, long_tokens: int = 200) -> float:
    """TTFT of a short request sent once 8 long generations have started."""
    convs = conversations(9, run=4)
    threads = [threading.Thread(target=stream_one, args=(base_url, model, c, long_tokens)) for c in convs[:8]]
    for t in threads:
        t.start()
    time.sleep(3.0)
    ttft = stream_one(base_url, model, convs[8], 16)["ttft"]
    for t in threads:
        t.join()
    return ttft


def server_tables(model_dir: str, concurrency: list[int], new_tokens: int, max_batch: int) -> dict:
    from persllm_jax.inference.serving import ServerProcess
    from tests.llm_servers import TransformersServer

    servers = {
        "persllm serve": lambda: ServerProcess(model_dir, max_batch=max_batch),
        "transformers serve --continuous-batching": lambda: TransformersServer(
            model_dir, extra_args=["--continuous-batching"]
        ),
    }
    measured: dict[str, dict] = {}
    for name, make in servers.items():
        with make() as server:
            model = getattr(server, "model_name", None) or server.model
            measured[name] = {n: flood(server.base_url, model, n, new_tokens) for n in concurrency}
            measured[name]["arrival"] = arrival(server.base_url, model)
    ours, theirs = measured["persllm serve"], measured["transformers serve --continuous-batching"]
    print(f"\n## serve: concurrent streaming persona requests, greedy, {new_tokens} new tokens")
    print(
        "| requests | persllm serve tokens/s | transformers serve --continuous-batching tokens/s | ratio "
        "| TTFT mean / max, ours | TTFT mean / max, transformers |"
    )
    print("|---|---|---|---|---|---|")
    for n in concurrency:
        a, b = ours[n], theirs[n]
        print(
            f"| {n} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | {a['tok_s'] / b['tok_s']:.2f}x "
            f"| {a['ttft_mean']:.2f} / {a['ttft_max']:.2f} s | {b['ttft_mean']:.2f} / {b['ttft_max']:.2f} s |"
        )
    print("\n## arrival: time to first token of a request sent while 8 long generations run")
    print(
        f"persllm serve {ours['arrival']:.2f} s; transformers serve --continuous-batching {theirs['arrival']:.2f} s"
    )
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--parts", nargs="+", default=["generate", "serve"], choices=["generate", "serve"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-batch", type=int, default=32, help="persllm serve's decode slots")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--worker", choices=["ours", "transformers", "ours_unrolled"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = {
            "ours": run_ours,
            "ours_unrolled": functools.partial(run_ours, unroll_layers=True),
            "transformers": run_transformers,
        }[args.worker]
        print(json.dumps(run(args.model, args.batch, args.new_tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from persllm_jax.io.offline_models import smollm2_gguf
            from tests.hf_fixtures import gguf_to_hf_dir

            model_dir = str(gguf_to_hf_dir(smollm2_gguf(), Path(tmp) / "smollm2"))
        print(f"model {Path(args.model or 'SmolLM2-135M-Instruct').name}, fp32, this machine")
        results: dict = {}
        if "generate" in args.parts:
            results["generate"] = batch_table(model_dir, args.batches, args.new_tokens)
        if "serve" in args.parts:
            results["serve"] = server_tables(model_dir, args.concurrency, args.new_tokens, args.max_batch)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
