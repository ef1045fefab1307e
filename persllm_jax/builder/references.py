"""Reference dialogues in a build: each persona's hand-written `reference.jsonl` joins the
annotated items as items of its own, split train/test by question group (the dialogues that ask
one question at several stages stay together, so a question asked at both stages never has one
stage in train and the other in test), and the first dialogue of a group carries the group's other
answers, so the cross-stage miner pairs them as it pairs an annotated item's answers."""

from __future__ import annotations

from collections import defaultdict

from persllm_jax.builder.cleaning import held_out_keys
from persllm_jax.builder.retrieval import nearest
from persllm_jax.personas.reference_dialogues import read_reference_dialogues, reference_file


def _answer(record: dict) -> dict:
    return {"response": record["messages"][2]["content"], "analysis": record["analysis"]}


def group_splits(records: list[dict], test_fraction: float, seed: int) -> dict[str, str]:
    """Record id -> "train" | "test": per persona, a seeded `test_fraction` of its question groups
    (a dialogue without a group is a group of its own) goes to test."""
    key = {r["id"]: r["group"] or r["id"] for r in records}
    keys_by_persona = defaultdict(set)
    for record in records:
        keys_by_persona[record["persona"]].add(key[record["id"]])
    test_keys = held_out_keys(keys_by_persona, test_fraction, seed)
    return {rid: "test" if k in test_keys else "train" for rid, k in key.items()}


def reference_items(personas, personas_dir, test_fraction: float, seed: int, make_item) -> list:
    """The reference dialogues of `personas` as build items, split by group; `make_item(**fields)`
    builds one."""
    records = []
    for persona in personas:
        path = reference_file(personas_dir, persona.id)
        if path is not None:
            records += read_reference_dialogues(path, persona)
    splits = group_splits(records, test_fraction, seed)
    first_of_group: dict[str, object] = {}
    items = []
    for record in records:
        item = make_item(
            id=record["id"],
            persona=record["persona"],
            stage=record["stage"],
            kind=record["kind"],
            seed_id=record["seed_id"],
            question=record["messages"][1]["content"],
            answers={record["stage"]: _answer(record)},
            split=splits[record["id"]],
        )
        group = record["group"]
        if group is not None and group in first_of_group:
            first_of_group[group].answers[record["stage"]] = _answer(record)
        elif group is not None:
            first_of_group[group] = item
        items.append(item)
    return items


class ReferenceExamples:
    """Worked examples for the annotator: for a question to `persona` at `stage`, up to `count`
    train-split reference answers of that persona at that stage whose questions are nearest it.
    Test-split answers never serve (what the annotator sees may end up in training data, and the
    held-out answers are evaluation data), nor does a question as close to the seed's as the
    near-duplicate threshold: an annotator shown the same question with its answer copies it."""

    def __init__(self, items, embedder, count: int, too_close: float):
        self.count, self.embedder, self.too_close = count, embedder, too_close
        self.examples: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)
        seen = set()
        for item in items:
            if item.split != "train":
                continue
            for stage, answer in item.answers.items():
                key = (item.persona, stage, item.question)
                if key not in seen:
                    seen.add(key)
                    self.examples[(item.persona, stage)].append(
                        (item.question, answer["analysis"], answer["response"])
                    )
        self.vectors = {
            key: embedder.encode([question for question, _, _ in found])
            for key, found in self.examples.items()
        }

    def __call__(self, persona: str, stage: str, question: str) -> list[tuple[str, str, str]]:
        found = self.examples.get((persona, stage), [])
        if not found:
            return []
        query = self.embedder.encode([question])[0]
        vectors = self.vectors[(persona, stage)]
        similarity = vectors @ query
        order = [i for i in nearest(query, vectors) if similarity[i] < self.too_close]
        return [found[i] for i in order[: self.count]][::-1]  # the nearest last, next to the question
