"""Held-out questions and the answers a model gives to them as each persona and stage.

For a test question of persona P at stage S the model answers: twice as (P, S) with different
seeds (Intra BLEU), once as P at each other stage (Stage BLEU), and once as every other persona Q
at Q's stage of the same position (Inter BLEU). The identity is set the way training sets it:
the stage token and the persona's description in the system message.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

from persllm_jax.inference.generation import Generator, SamplingParams
from persllm_jax.personas.materials import Persona
from persllm_jax.personas.prompts import persona_conversation


@dataclasses.dataclass(frozen=True)
class TestItem:
    item_id: str
    persona: str
    stage: str
    kind: str
    question: str
    reference: str


def test_items(records: Sequence[dict], personas: dict[str, Persona], max_items: int = 0) -> list[TestItem]:
    """Persona questions of the held-out split (first user turn and the reference answer after it).

    With `max_items`, items are taken round-robin over (persona, stage) groups so every group
    keeps a share."""
    groups: dict[tuple[str, str], list[TestItem]] = defaultdict(list)
    for record in records:
        if record.get("kind") == "general" or record.get("persona") not in personas:
            continue
        messages = record["messages"]
        user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if user is None or user + 1 >= len(messages) or messages[user + 1]["role"] != "assistant":
            continue
        item = TestItem(
            record["id"],
            record["persona"],
            record["stage"],
            record.get("kind", ""),
            messages[user]["content"],
            messages[user + 1]["content"],
        )
        groups[(item.persona, item.stage)].append(item)
    queues = [groups[key] for key in sorted(groups)]
    picked: list[TestItem] = []
    while any(queues) and (max_items <= 0 or len(picked) < max_items):
        for queue in queues:
            if queue and (max_items <= 0 or len(picked) < max_items):
                picked.append(queue.pop(0))
    return picked


def _stage_like(persona: Persona, position: int):
    return persona.stages[min(position, len(persona.stages) - 1)]


def answer_requests(items: Sequence[TestItem], personas: dict[str, Persona]) -> list[dict]:
    """One request per (item, identity, sample): the record fields without the answer."""
    requests = []
    for item in items:
        owner = personas[item.persona]
        position = [s.id for s in owner.stages].index(item.stage)
        variants = [(owner.id, item.stage, 0), (owner.id, item.stage, 1)]
        variants += [(owner.id, s.id, 0) for s in owner.stages if s.id != item.stage]
        variants += [(q.id, _stage_like(q, position).id, 0) for q in personas.values() if q.id != owner.id]
        for as_persona, as_stage, sample in variants:
            requests.append(
                {
                    **dataclasses.asdict(item),
                    "as_persona": as_persona,
                    "as_stage": as_stage,
                    "sample": sample,
                }
            )
    return requests


def conversation(request: dict, personas: dict[str, Persona]) -> list[dict]:
    persona = personas[request["as_persona"]]
    return persona_conversation(persona, persona.stage(request["as_stage"]), request["question"])


def answer_all(
    generator: Generator,
    model_name: str,
    requests: Sequence[dict],
    personas: dict[str, Persona],
    settings,
    progress=None,
) -> list[dict]:
    """Answer every request; request i samples with seed `settings.seed + i`, the same for every
    model, so models are compared on the same random streams."""
    records = []
    for start in range(0, len(requests), settings.batch_size):
        chunk = requests[start : start + settings.batch_size]
        params = [
            SamplingParams(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                repetition_penalty=settings.repetition_penalty,
                seed=settings.seed + start + i,
            )
            for i in range(len(chunk))
        ]
        completions = generator.chat([conversation(r, personas) for r in chunk], params)
        records += [{"model": model_name, **r, "answer": c.text.strip()} for r, c in zip(chunk, completions)]
        if progress is not None:
            progress.update(len(chunk))
    return records
