"""What `persllm build-data` writes into `out_dir`.

annotations.jsonl   every seed's record: kind, question, retrieved paragraph ids, analysis,
                    response per answering stage, usage, and the drop reason if dropped
dialogues.jsonl     SFT dialogues (TRL conversational rows with id, persona, stage, kind, analysis,
                    seed_id, split), persona items then general chats
pairs.jsonl         preference pairs (TRL conversational preference rows with id, persona, stage,
                    source, split)
stats.json          counts per persona / stage / kind, drop reasons, requests, cache hits, tokens
hf/dialogues, hf/pairs   `datasets` DatasetDict directories with train / test splits
tfds/               a TFDS dataset (array_record) readable with tfds.data_source
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from persllm_jax.personas.prompts import system_prompt

log = logging.getLogger(__name__)


def system_message(persona_id: str, stage_id: str, personas, stages) -> dict:
    return {"role": "system", "content": system_prompt(personas[persona_id], stages[(persona_id, stage_id)])}


def dialogue_row(item, personas, stages) -> dict:
    answer = item.answers[item.stage]
    return {
        "id": item.id,
        "persona": item.persona,
        "stage": item.stage,
        "kind": item.kind,
        "messages": [
            system_message(item.persona, item.stage, personas, stages),
            {"role": "user", "content": item.question},
            {"role": "assistant", "content": answer["response"]},
        ],
        "analysis": answer.get("analysis") or None,
        "seed_id": item.seed_id,
        "split": item.split,
    }


def general_rows(cfg, num_persona_dialogues: int, seed: int) -> list[dict]:
    """General chats in messages format, `repeats` copies per persona dialogue copy (fractions
    take a seeded subset), all in the train split."""
    if not cfg.path:
        return []
    from persllm_jax.data.formats import sft_example
    from persllm_jax.data.readers import read_records

    records = read_records(cfg.path, split="train")
    if cfg.max_items:
        records = records[: cfg.max_items]
    examples = [(general_id(r), sft_example(r)) for r in records]
    conversational = [(i, e) for i, e in examples if e.messages]
    if len(conversational) < len(examples):
        raise ValueError(f"general_data.path {cfg.path}: every record must be a conversation (messages)")
    whole, fraction = int(cfg.repeats), cfg.repeats - int(cfg.repeats)
    copies = [(ie, c) for c in range(whole) for ie in conversational]
    if fraction > 0:
        rng = np.random.default_rng(seed)
        count = int(round(fraction * len(conversational)))
        copies += [
            (conversational[i], whole) for i in sorted(rng.choice(len(conversational), count, replace=False))
        ]
    return [
        {
            "id": f"general/{gid}/{c}",
            "persona": "",
            "stage": "",
            "kind": "general",
            "messages": [dict(m) for m in e.messages],
            "analysis": None,
            "seed_id": "",
            "split": "train",
        }
        for (gid, e), c in copies
    ]


def general_id(record: dict) -> str:
    """A general chat's id: its own, or its place in its file (line or row) and a digest of its
    messages; never the file's path, so the same build gives the same ids on any machine."""
    if record.get("id") is not None:
        return str(record["id"])
    place = record.get("_line", record.get("_index", 0))
    content = json.dumps(record.get("messages"), sort_keys=True, ensure_ascii=False)
    return f"{place:05d}-{hashlib.sha256(content.encode()).hexdigest()[:10]}"


def annotation_row(item) -> dict:
    return {
        "id": item.id,
        "persona": item.persona,
        "stage": item.stage,
        "kind": item.kind,
        "seed_id": item.seed_id,
        "question": item.question,
        "answers": item.answers,
        "usage": _usage_total([a.get("usage") for a in item.answers.values()]),
        "split": item.split,
        "dropped": item.drop_reason,
    }


def _usage_total(usages) -> dict:
    total = Counter()
    for usage in usages:
        for key, value in (usage or {}).items():
            if isinstance(value, (int, float)):
                total[key] += value
    return dict(total)


def stats(items, dialogues, pair_rows, general, client_stats, references: int = 0) -> dict:
    kept = [d for d in dialogues]
    counts: dict = {}
    for d in kept:
        counts.setdefault(d["persona"], {}).setdefault(d["stage"], Counter())[d["kind"]] += 1
    drops = Counter(i.drop_reason for i in items if i.drop_reason)
    return {
        "seeds": len(items),
        "dialogues": len(kept),
        "reference_dialogues": references,
        "dialogues_by_split": dict(Counter(d["split"] for d in kept)),
        "dialogues_by_persona_stage_kind": {p: {s: dict(c) for s, c in v.items()} for p, v in counts.items()},
        "general_dialogues": len(general),
        "pairs": len(pair_rows),
        "pairs_by_source": dict(Counter(p["source"] for p in pair_rows)),
        "pairs_by_split": dict(Counter(p["split"] for p in pair_rows)),
        "dropped": sum(drops.values()),
        "drop_reasons": dict(drops),
        "llm": client_stats,
    }


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_hf_datasets(out_dir: Path, name: str, rows: list[dict]) -> Path:
    import datasets

    splits = {}
    for split in ("train", "test"):
        subset = [r for r in rows if r["split"] == split]
        if subset:
            splits[split] = datasets.Dataset.from_list(subset)
    path = out_dir / "hf" / name
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def write_all(out_dir: Path, items, dialogues, pair_rows, stats_: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "annotations.jsonl", [annotation_row(i) for i in items])
    write_jsonl(out_dir / "dialogues.jsonl", dialogues)
    write_jsonl(out_dir / "pairs.jsonl", pair_rows)
    write_hf_datasets(out_dir, "dialogues", dialogues)
    if pair_rows:
        write_hf_datasets(out_dir, "pairs", pair_rows)
    from persllm_jax.builder import tfds_output

    tfds_output.write(out_dir / "tfds", dialogues, pair_rows)
    (out_dir / "stats.json").write_text(json.dumps(stats_, indent=2))
    log.info("wrote %s: %d dialogues, %d pairs", out_dir, len(dialogues), len(pair_rows))
