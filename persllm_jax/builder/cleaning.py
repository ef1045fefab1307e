"""Cleaning as the paper does it, made reproducible: near-duplicate questions dropped (both
stages of a persona in one pool), then a seeded train/test split by seed paragraph."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict

import numpy as np


def drop_near_duplicates(items, embedder, threshold: float):
    """Keep items in id order; drop one whose question has cosine >= threshold with a kept
    question of the same persona. Returns (kept, dropped)."""
    kept, dropped = [], []
    by_persona = defaultdict(list)
    for item in sorted(items, key=lambda i: i.id):
        by_persona[item.persona].append(item)
    for persona_items in by_persona.values():
        vectors = embedder.encode([i.question for i in persona_items])
        kept_vectors: list[np.ndarray] = []
        for item, vector in zip(persona_items, vectors):
            if kept_vectors and float(np.max(np.stack(kept_vectors) @ vector)) >= threshold:
                dropped.append(item)
            else:
                kept.append(item)
                kept_vectors.append(vector)
    return kept, dropped


def _order_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def held_out_keys(keys_by_pool: dict, test_fraction: float, seed: int) -> set:
    """Per pool, a seeded `test_fraction` of its keys (rounded half up): the keys that go to test."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"split.test_fraction must be in [0, 1), got {test_fraction}")
    test = set()
    for keys in keys_by_pool.values():
        ordered = sorted(keys, key=lambda k: _order_key(seed, k))
        test.update(ordered[: math.floor(test_fraction * len(ordered) + 0.5)])
    return test


def assign_splits(items, test_fraction: float, seed: int) -> None:
    """Per persona and stage, a seeded `test_fraction` of the seed paragraphs goes to test; every
    item of a seed paragraph follows it, so no paragraph has items in both splits."""
    seeds_by_stage = defaultdict(set)
    for item in items:
        seeds_by_stage[(item.persona, item.stage)].add(item.seed_id)
    test_seeds = held_out_keys(seeds_by_stage, test_fraction, seed)
    for item in items:
        item.split = "test" if item.seed_id in test_seeds else "train"
