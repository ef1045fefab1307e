"""Automatically mined preference pairs, for the DPO stage that follows SFT.

cross_stage: a question answered with its own stage's materials is chosen; the same question
answered with another stage's materials is rejected (and the reverse for that other stage).
cross_persona: the rejected answer is another persona's answer to a similar question: rank the
other personas' questions by embedding similarity, skip the `skip_top` most similar (their
answers may fit too), take the first whose answer differs from the chosen one. Candidates come
from the same split, so test answers never appear in training pairs; a pair inherits its
question's split. Mirrored, each also gives the pair under the other persona's prompt (at the
stage of its answer) with the same question, that persona's answer chosen: the two together
compare each answer under its own persona's prompt and the other's, which one-way pairs never
do (they compare two answers under one prompt).
"""

from __future__ import annotations

import json

import numpy as np

from persllm_jax.builder.outputs import system_message


def _same(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _pair(item, stage_id, source, chosen, rejected, personas, stages, suffix, persona_id=None):
    persona_id = persona_id or item.persona
    return {
        "id": f"{item.id}/{source}/{suffix}",
        "persona": persona_id,
        "stage": stage_id,
        "source": source,
        "prompt": [
            system_message(persona_id, stage_id, personas, stages),
            {"role": "user", "content": item.question},
        ],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "split": item.split,
    }


def cross_stage_pairs(items, personas, stages, mirrored: bool = True) -> list[dict]:
    rows = []
    for item in items:
        own = item.answers[item.stage]["response"]
        for stage_id, answer in sorted(item.answers.items()):
            other = answer.get("response")
            if stage_id == item.stage or other is None or _same(own, other):
                continue
            rows.append(_pair(item, item.stage, "cross_stage", own, other, personas, stages, stage_id))
            if mirrored:
                rows.append(
                    _pair(item, stage_id, "cross_stage", other, own, personas, stages, f"{stage_id}-chosen")
                )
    return rows


def cross_persona_pairs(
    items, embedder, personas, stages, skip_top: int, mirrored: bool = False
) -> list[dict]:
    rows = []
    if not items:
        return rows
    vectors = embedder.encode([i.question for i in items])
    for index, item in enumerate(items):
        candidates = [
            j for j, other in enumerate(items) if other.persona != item.persona and other.split == item.split
        ]
        if not candidates:
            continue
        similarity = vectors[candidates] @ vectors[index]
        ranked = [candidates[k] for k in np.argsort(-similarity, kind="stable")]
        # With fewer candidates than skip_top + 1 (small runs), skip as many as leaves one.
        skip = min(skip_top, len(ranked) - 1)
        chosen = item.answers[item.stage]["response"]
        for j in ranked[skip:]:
            other = items[j]
            rejected = other.answers[other.stage]["response"]
            if not _same(chosen, rejected):
                rows.append(
                    _pair(
                        item, item.stage, "cross_persona", chosen, rejected, personas, stages, other.persona
                    )
                )
                if mirrored:
                    rows.append(
                        _pair(
                            item,
                            other.stage,
                            "cross_persona",
                            rejected,
                            chosen,
                            personas,
                            stages,
                            f"{other.persona}-chosen",
                            persona_id=other.persona,
                        )
                    )
                break
    return _unique_units(rows) if mirrored else rows


def _content(row: dict) -> str:
    return json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True)


def _unique_units(rows: list[dict]) -> list[dict]:
    """Mirrored rows (pair, mirror, pair, mirror, ...) without repeats: two personas asked the same
    question who drew each other's answer give one pair and its mirror, not that unit twice (the
    DPO loader trains a pair with its mirror only when exactly two pairs share their question and
    answers)."""
    seen, kept = set(), []
    for pair, mirror in zip(rows[0::2], rows[1::2]):
        keys = {_content(pair), _content(mirror)}
        if keys & seen:
            continue
        seen |= keys
        kept += [pair, mirror]
    return kept
