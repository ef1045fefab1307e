"""Distinction BLEU (PersLLM supplementary Table 2): how much personas and stages differ.

All scores are sacrebleu corpus BLEU (default 13a tokenizer, exp smoothing) on 0-100, with the model's
sample-0 answer as its own persona and stage as the hypothesis of every comparison:

* Intra(P): against sample 1 of the same persona and stage (how self-consistent P is; higher is better);
* Stage(P): against the answer given as another stage of P (lower = stages differ more);
* Inter(P): against the answer given as another persona Q, averaged over Q (lower = more distinct).

Each metric is one corpus BLEU over all of P's test items that have the variant, so it is not an average of
sentence BLEUs. Metrics a persona has no variant for are None, and the macro averages skip them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean

import sacrebleu

RECORD_KEYS = (
    "model",
    "item_id",
    "persona",
    "stage",
    "kind",
    "as_persona",
    "as_stage",
    "sample",
    "question",
    "reference",
    "answer",
)
METRICS = ("intra", "stage", "inter")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of `hypotheses` against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("BLEU of an empty corpus is undefined")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def validate_records(records: Iterable[Mapping]) -> list[Mapping]:
    """The records as a list; a clear error for a record that lacks a key or repeats an answer slot."""
    out = []
    seen: dict[tuple, int] = {}
    owner: dict[str, tuple[str, str, int]] = {}
    for index, record in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"answer record {index} lacks {missing}; each record needs {list(RECORD_KEYS)}")
        if not isinstance(record["answer"], str):
            raise ValueError(
                f"answer record {index} ({record['item_id']}): answer must be a string, "
                f"got {type(record['answer']).__name__}"
            )
        slot = _slot(record)
        if slot in seen:
            raise ValueError(f"answer records {seen[slot]} and {index} are both {slot}")
        seen[slot] = index
        persona, stage, first = owner.setdefault(
            record["item_id"], (record["persona"], record["stage"], index)
        )
        if (persona, stage) != (record["persona"], record["stage"]):
            raise ValueError(
                f"item {record['item_id']!r} belongs to {persona}/{stage} in record {first} "
                f"but to {record['persona']}/{record['stage']} in record {index}"
            )
        out.append(record)
    return out


def _slot(record: Mapping) -> tuple:
    return (
        record["model"],
        record["item_id"],
        record["as_persona"],
        record["as_stage"],
        int(record["sample"]),
    )


def is_own(record: Mapping) -> bool:
    """Whether the record answers its item as the item's own persona and stage."""
    return record["as_persona"] == record["persona"] and record["as_stage"] == record["stage"]


def _persona_distinction(items: Mapping[str, list[Mapping]], stage_order: Sequence[str]) -> dict:
    """Intra/Stage/Inter of one persona of one model; `items` maps item_id -> its answer records."""
    intra_pairs: list[tuple[str, str]] = []
    stage_rounds: dict[int, list[tuple[str, str]]] = defaultdict(list)
    inter_pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for records in items.values():
        own = {int(r["sample"]): r["answer"] for r in records if is_own(r)}
        if 0 not in own:
            continue  # no hypothesis for this item
        hyp = own[0]
        if 1 in own:
            intra_pairs.append((hyp, own[1]))
        persona, stage = records[0]["persona"], records[0]["stage"]
        other_stages = {
            r["as_stage"]: r["answer"]
            for r in records
            if int(r["sample"]) == 0 and r["as_persona"] == persona and r["as_stage"] != stage
        }
        # With two stages every item has one other stage and Stage(P) is a single corpus BLEU over P's items;
        # with more, round k pairs each item with its k-th other stage and the rounds' BLEUs are averaged.
        for k, other in enumerate(sorted(other_stages, key=stage_order.index)):
            stage_rounds[k].append((hyp, other_stages[other]))
        for r in records:
            if int(r["sample"]) == 0 and r["as_persona"] != persona:
                inter_pairs[r["as_persona"]].append((hyp, r["answer"]))

    def corpus(pairs: list[tuple[str, str]]) -> float:
        return bleu([h for h, _ in pairs], [ref for _, ref in pairs])

    return {
        "intra": corpus(intra_pairs) if intra_pairs else None,
        "stage": fmean(corpus(p) for p in stage_rounds.values()) if stage_rounds else None,
        "inter": fmean(corpus(p) for p in inter_pairs.values()) if inter_pairs else None,
        "n_items": len(items),
    }


def macro_average(per_persona: Mapping[str, Mapping]) -> dict:
    """Mean of each metric over the personas that have it, with how many personas each mean covers."""
    out: dict = {}
    for metric in METRICS:
        values = [m[metric] for m in per_persona.values() if m.get(metric) is not None]
        out[metric] = fmean(values) if values else None
        out[f"n_{metric}"] = len(values)
    out["n_personas"] = len(per_persona)
    out["n_items"] = sum(m.get("n_items", 0) for m in per_persona.values())
    return out


def distinction_bleu(records: Iterable[Mapping]) -> dict[str, dict]:
    """Distinction BLEU per model.

    Args:
        records: answer records (see `RECORD_KEYS`) of one or more models.

    Returns:
        ``{model: {"personas": {persona: {"intra", "stage", "inter", "n_items"}}, "average": {...}}}``
        where metrics are BLEU on 0-100 or None (no variant to compare), and "average" holds the macro means
        over personas plus ``n_<metric>`` (personas averaged), ``n_personas`` and ``n_items``.
    """
    records = validate_records(records)
    stage_order: dict[str, list[str]] = defaultdict(list)
    for r in records:  # stages in first-seen order, for a stable round order in Stage(P)
        for persona, stage in ((r["persona"], r["stage"]), (r["as_persona"], r["as_stage"])):
            if stage not in stage_order[persona]:
                stage_order[persona].append(stage)
    grouped: dict[str, dict[str, dict[str, list[Mapping]]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        grouped[r["model"]][r["persona"]].setdefault(r["item_id"], []).append(r)
    result = {}
    for model, personas in grouped.items():
        per_persona = {
            persona: _persona_distinction(items, stage_order[persona])
            for persona, items in sorted(personas.items())
        }
        result[model] = {"personas": per_persona, "average": macro_average(per_persona)}
    return result
