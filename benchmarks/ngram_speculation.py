"""How far n-gram (prompt-lookup) speculative decoding could take `generate` on the throughput
benchmark's batches, measured on the tokens greedy decoding actually produces.

Speculation drafts the next k tokens by finding the row's last n tokens (n = 3, 2, 1) earlier in
its prompt or reply and copying what followed; one model call then checks the k drafts and keeps
the agreeing ones, so a row advances by 1 + (drafts accepted) tokens a call and greedy output is
unchanged. A batch runs until its longest row ends, so what counts for throughput is the number of
calls of the slowest row, not the mean acceptance. This script takes transformers' greedy replies
to the benchmark's prompts (`generate_throughput.py`'s batches, 64 new tokens), replays the
drafting on them, and prints per batch: calls without and with speculation, and the speed-up
that would give if a call checking k drafts cost no more than a plain decode call (an upper
bound: on this CPU a call over 1 + k tokens a row costs more).

    python benchmarks/ngram_speculation.py --batches 8 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate_throughput import transformers_batch  # noqa: E402


def draft(context: list[int], k: int, longest: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens."""
    for n in range(longest, 0, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + k]
    return []


def calls_with_speculation(prompt: list[int], reply: list[int], k: int) -> tuple[int, int]:
    """(decode calls, drafts accepted) for one row: its first token comes from the prefill call."""
    context, done, calls, accepted = [*prompt, reply[0]], 1, 0, 0
    while done < len(reply):
        proposal = draft(context, k)
        agree = 0
        while agree < len(proposal) and done + agree < len(reply) and proposal[agree] == reply[done + agree]:
            agree += 1
        step = min(agree + 1, len(reply) - done)
        context += reply[done : done + step]
        done, calls, accepted = done + step, calls + 1, accepted + step - 1
    return calls, accepted


def greedy_replies(model_dir: str, batch: int, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids up to and with its end-of-turn token) per row, as the benchmark runs."""
    import torch

    tokenizer, model, enc, end = transformers_batch(model_dir, batch)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    rows = []
    for i in range(batch):
        prompt = [t for t, m in zip(enc["input_ids"][i].tolist(), enc["attention_mask"][i].tolist()) if m]
        new = out[i, enc["input_ids"].shape[1] :].tolist()
        stop = next((j for j, t in enumerate(new) if t in end), None)
        rows.append((prompt, new if stop is None else new[: stop + 1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="an HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--drafts", type=int, nargs="+", default=[2, 3, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            sys.path.insert(0, str(ROOT))
            from persllm_jax.io.offline_models import smollm2_gguf
            from tests.hf_fixtures import gguf_to_hf_dir

            model_dir = str(gguf_to_hf_dir(smollm2_gguf(), Path(tmp) / "smollm2"))
        print(
            "| batch | drafts k | tokens a call, all rows | decode calls plain | with speculation | bound |"
        )
        print("|---|---|---|---|---|---|")
        for batch in args.batches:
            rows = greedy_replies(model_dir, batch, args.new_tokens)
            plain = max(len(reply) - 1 for _, reply in rows)
            for k in args.drafts:
                counted = [calls_with_speculation(prompt, reply, k) for prompt, reply in rows]
                calls = max(c for c, _ in counted)
                per_call = sum(c + a for c, a in counted) / max(sum(c for c, _ in counted), 1)
                print(
                    f"| {batch} | {k} | {per_call:.2f} | {plain} | {calls} | {plain / max(calls, 1):.2f}x |"
                )


if __name__ == "__main__":
    main()
