"""On-policy preference pairs: a model's own sampled answers to SFT dialogues' questions, each the
rejected side of a pair whose chosen side is the dialogue's written answer (`persllm dpo` with
`dpo.on_policy`, train/tasks/on_policy.py)."""

from __future__ import annotations

from persllm_jax.data.readers import location
from persllm_jax.inference.generation import Generator, SamplingParams
from persllm_jax.train.tasks.on_policy import prompt_and_answer


def sample_pairs(model, tokenizer, dialogues: list[dict], section) -> list[dict]:
    """One pair per dialogue whose sampled answer differs from its own: the model's answer to the
    dialogue's prompt (row i sampled with seed `section.seed + i`) rejected, the dialogue's answer
    chosen."""
    prompts = [prompt_and_answer(d) for d in dialogues]
    settings = [
        SamplingParams(
            max_new_tokens=section.max_new_tokens,
            temperature=section.temperature,
            top_p=section.top_p,
            seed=section.seed + i,
        )
        for i in range(len(dialogues))
    ]
    generator = Generator(model, tokenizer, max_batch=min(16, max(1, len(dialogues))))
    replies = [c.text for c in generator.chat([prompt for prompt, _ in prompts], settings)]
    pairs = []
    for record, (prompt, answer), reply in zip(dialogues, prompts, replies):
        if not reply.strip() or " ".join(reply.split()) == " ".join(str(answer["content"]).split()):
            continue
        pairs.append(
            {
                "id": f"{record.get('id', location(record))}/on_policy",
                "persona": record.get("persona"),
                "stage": record.get("stage"),
                "source": "on_policy",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer["content"]}],
                "rejected": [{"role": "assistant", "content": reply}],
                "split": "train",
            }
        )
    return pairs
