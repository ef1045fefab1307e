"""On-policy preference pairs: a model's own sampled answers to SFT dialogues' questions, each the
rejected side of a pair whose chosen side is the dialogue's written answer (`persllm dpo` with
`dpo.on_policy`, train/tasks/on_policy.py)."""

from __future__ import annotations

from persllm_jax.data.readers import location
from persllm_jax.inference.generation import Generator, SamplingParams
from persllm_jax.train.tasks.on_policy import prompt_and_answer


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def sample_pairs(model, tokenizer, dialogues: list[dict], section) -> tuple[list[dict], int]:
    """One pair per dialogue whose sampled answer is neither blank nor its own: the model's answer
    to the dialogue's prompt (row i sampled with seed `section.seed + i`) rejected, the dialogue's
    answer chosen; and how many answers stopped at `section.max_new_tokens` (kept: a small model's
    answer that runs to the limit is what it would say)."""
    turns = [prompt_and_answer(d) for d in dialogues]
    settings = [
        SamplingParams(
            max_new_tokens=section.max_new_tokens,
            temperature=section.temperature,
            top_p=section.top_p,
            seed=section.seed + i,
        )
        for i in range(len(dialogues))
    ]
    # `dialogues` is never empty: the caller names a kind with no dialogue
    generator = Generator(model, tokenizer, max_batch=min(16, len(dialogues)))
    try:
        replies = generator.chat([prompt for prompt, _ in turns], settings)
    finally:
        generator.release_cache()  # its KV pages are not held into training
    pairs = []
    for record, (prompt, answer), reply in zip(dialogues, turns, replies):
        if not reply.text.strip() or _same(reply.text, str(answer["content"])):
            continue
        pairs.append(
            {
                "id": f"{record.get('id', location(record))}/on_policy",
                "persona": record.get("persona"),
                "stage": record.get("stage"),
                "source": "on_policy",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer["content"]}],
                "rejected": [{"role": "assistant", "content": reply.text}],
                "split": "train",
            }
        )
    return pairs, sum(reply.finish_reason == "length" for reply in replies)
