"""Persona and stage attribution: whose reply is this, according to the model?

For each held-out reference answer (the persona's reply to a test question), the model scores the
same reply as the answer of every persona (each at its stage of the same position) and, within the
answer's own persona, at every stage. The attributed identity is the one whose system message
makes the reply most likely (mean log-probability of its tokens). A model that learned the
personas attributes their answers to them; one that did not is near chance (1 / number of
personas, 1 / number of stages).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from persllm_jax.evaluation.answers import TestItem
from persllm_jax.personas.materials import Persona
from persllm_jax.personas.prompts import persona_conversation
from persllm_jax.train.probing.metrics import interval
from persllm_jax.train.probing.scoring import EncodedReply, ReplyScorer, encode_reply


def _identities(item: TestItem, personas: Mapping[str, Persona]):
    """(persona candidates, stage candidates) for an item, each a list of (persona, stage) ids."""
    owner = personas[item.persona]
    position = [s.id for s in owner.stages].index(item.stage)
    as_personas = [(q.id, q.stages[min(position, len(q.stages) - 1)].id) for q in personas.values()]
    as_stages = [(owner.id, s.id) for s in owner.stages]
    return as_personas, as_stages


# Scores closer than this (mean log-prob per token) are equal: the same reply under two prompts
# that differ only in a stage token whose rows are equal moved by up to 3e-6 in float32 when the two
# prompts ran in batches of different shapes (SmolLM2-135M, the example probe sets).
TIE_TOLERANCE = 1e-5


def _rank(scores: np.ndarray, own: int) -> tuple[float, float]:
    """(rank, top-1) of the own candidate, expected over a random order of equal scores: a model
    that scores every candidate alike (stage-token rows left equal) is at chance, not always right."""
    gap = scores - scores[own]
    higher = int((gap > TIE_TOLERANCE).sum())
    tied = int((np.abs(gap) <= TIE_TOLERANCE).sum()) - 1
    return 1 + higher + tied / 2, (1.0 / (1 + tied) if higher == 0 else 0.0)


def attribution(
    scorer: ReplyScorer, state, items: Sequence[TestItem], personas: Mapping[str, Persona], seed: int = 0
) -> dict:
    """Top-1 accuracy (with its bootstrap interval and n), mean rank and chance, for persona and stage."""
    items = [i for i in items if i.persona in personas]
    encoded: dict[tuple[str, str, str], EncodedReply] = {}
    for item in items:
        as_personas, as_stages = _identities(item, personas)
        for persona_id, stage_id in {*as_personas, *as_stages}:
            persona = personas[persona_id]
            messages = persona_conversation(persona, persona.stage(stage_id), item.question)
            encoded[(item.item_id, persona_id, stage_id)] = encode_reply(
                scorer.tokenizer, messages, item.reference, what=f"held-out dialogue {item.item_id}"
            )
    result = {}
    if not items:
        return {
            name: {"top1": interval([]), "mean_rank": None, "chance": None} for name in ("persona", "stage")
        }
    keys = list(encoded)
    total, count = scorer.score(state, [encoded[k] for k in keys])
    mean = dict(zip(keys, total / np.maximum(count, 1)))
    for name, index in (("persona", 0), ("stage", 1)):
        ranks, top1, chance = [], [], []
        for item in items:
            candidates = _identities(item, personas)[index]
            scores = np.asarray([mean[(item.item_id, *c)] for c in candidates])
            rank, first = _rank(scores, candidates.index((item.persona, item.stage)))
            ranks.append(rank)
            top1.append(first)
            chance.append(1.0 / len(candidates))
        result[name] = {
            "top1": interval(top1, seed),
            "mean_rank": float(np.mean(ranks)),
            "chance": float(np.mean(chance)),
        }
    return result
