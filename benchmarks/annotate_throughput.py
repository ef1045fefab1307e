"""Annotator client throughput: our LLMClient against the same requests sent directly.

For each concurrency level, N chat requests go to an OpenAI-compatible server twice: once through
`persllm_jax.llm.client.LLMClient` (semaphore, retries, fsync'ed cache, counters, progress) and
once as bare `openai.AsyncOpenAI` calls under the same semaphore, with no client logic. Prints
requests/s, completion tokens/s and our overhead; the target is < 5% at the server's saturation
point (the concurrency beyond which throughput stops growing).

    python benchmarks/annotate_throughput.py                       # starts `transformers serve` with SmolLM2
    python benchmarks/annotate_throughput.py --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Name a colour of the sky.",
    "What do bees make?",
    "Say hello in French.",
    "What is two plus two?",
    "Name a fruit.",
    "What is the capital of England?",
    "Name a bird.",
    "What is ice made of?",
]


def messages(i: int) -> list[dict]:
    # distinct prompts so no server-side prefix cache or our own cache can answer for free
    return [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (question {i})"}]


async def direct(base_url: str, model: str, n: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=600)
    semaphore = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i):
        nonlocal tokens
        async with semaphore:
            response = await client.chat.completions.create(
                model=model, messages=messages(i), temperature=0.0, max_tokens=max_tokens
            )
            tokens += response.usage.completion_tokens if response.usage else 0

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed, tokens


async def ours(base_url: str, model: str, n: int, concurrency: int, max_tokens: int, round_id: int):
    from persllm_jax.llm.client import LLMClient
    from persllm_jax.llm.endpoint import EndpointConfig

    endpoint = EndpointConfig(base_url=base_url, model=model, concurrency=concurrency)
    with tempfile.TemporaryDirectory() as cache_dir:
        async with LLMClient.from_config(
            endpoint, cache_dir, temperature=0.0, max_tokens=max_tokens, seed=None
        ) as client:
            requests = [{"messages": messages(i), "tag": f"bench-{round_id}-{i}"} for i in range(n)]
            start = time.perf_counter()
            results = await client.complete_many(requests, progress=False)
            elapsed = time.perf_counter() - start
    failed = sum(1 for r in results if r.error)
    if failed:
        raise RuntimeError(f"{failed} requests failed through LLMClient")
    return elapsed, sum((r.usage or {}).get("completion_tokens", 0) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="", help="server to use; empty = start transformers serve")
    parser.add_argument("--model", default="", help="model name the server expects")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="1,2,4,8")
    args = parser.parse_args()

    server = None
    if not args.base_url:
        from tests.hf_fixtures import gguf_to_hf_dir, smollm2_gguf_path
        from tests.llm_servers import TransformersServer

        model_dir = Path(tempfile.mkdtemp(prefix="smollm2_")) / "hf"
        gguf_to_hf_dir(smollm2_gguf_path(), model_dir)
        server = TransformersServer(model_dir).start()
        args.base_url, args.model = server.base_url, server.model
    try:
        # warm the server up (first requests pay one-off costs) before anything is timed
        asyncio.run(direct(args.base_url, args.model, 2, 1, args.max_tokens))
        rows = []
        for round_id, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
            # alternate the order so neither side always meets a warmer server
            first, second = (direct, ours) if round_id % 2 == 0 else (ours, direct)
            timings = {}
            for fn in (first, second):
                extra = (round_id,) if fn is ours else ()
                timings[fn.__name__] = asyncio.run(
                    fn(args.base_url, args.model, args.requests, concurrency, args.max_tokens, *extra)
                )
            (t_direct, tok_direct), (t_ours, tok_ours) = timings["direct"], timings["ours"]
            rows.append(
                (
                    concurrency,
                    args.requests / t_direct,
                    tok_direct / t_direct,
                    args.requests / t_ours,
                    tok_ours / t_ours,
                    t_ours / t_direct - 1.0,
                )
            )
    finally:
        if server is not None:
            server.stop()
    print(
        f"\n## Annotator throughput: {args.requests} requests x {args.max_tokens} max tokens, {args.base_url}\n"
    )
    print("| concurrency | direct req/s | direct tok/s | LLMClient req/s | LLMClient tok/s | overhead |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c, rd, td, ro, to, overhead in rows:
        print(f"| {c} | {rd:.2f} | {td:.1f} | {ro:.2f} | {to:.1f} | {overhead * 100:+.1f}% |")
    best = max(rows, key=lambda r: r[1])
    print(
        f"\nsaturation (highest direct req/s) at concurrency {best[0]}: overhead {best[5] * 100:+.1f}% (target < 5%)"
    )


if __name__ == "__main__":
    main()
