"""The two-phase judging procedure of PersLLM section 3, through any OpenAI-compatible endpoint.

Four steps, each request cached by `persllm_jax.llm.client.LLMClient` so that a rerun sends nothing new:

(a) classify every test item (question + reference answer) once, independent of the models, as a Knowledge
    question, an Attitude question or Neither;
(b) score each model's answer against the reference from 0 (conflicting) to 5 (same knowledge / attitude),
    with the rubric the item's class calls for; Neither (and unclassifiable) items are not scored;
(c) anti-induction: for "induced" items (a false premise), ask whether the answer rejects the premise;
(d) ranking: the judge ranks all models' answers to one question against the reference (ties allowed); the
    models appear as letters in a seeded shuffled order so that no model always sits in the same position.

Steps (a), (c) and (d) go out together; (b) follows, as its rubric depends on (a). The judged answer of a
model is its sample 0 as the item's own persona and stage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from persllm_jax.evaluation.distinction import is_own, validate_records
from persllm_jax.evaluation.judge.aggregate import summarize_judgments
from persllm_jax.evaluation.judge.parsing import parse_label, parse_ranking, parse_score, parse_yes_no
from persllm_jax.evaluation.judge.prompts import (
    JudgeSettings,
    anonymize,
    classify_messages,
    induction_messages,
    ranking_messages,
    score_messages,
)
from persllm_jax.llm.endpoint import EndpointConfig

DEFAULT_SETTINGS = JudgeSettings()  # frozen, so one instance can be every call's default


def judged_answers(
    records: Iterable[Mapping], models: Sequence[str] | None = None
) -> dict[str, dict[str, str]]:
    """item_id -> {model: answer} of the answers the judge sees (sample 0 as the item's own identity)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for r in records:
        if is_own(r) and int(r["sample"]) == 0 and (models is None or r["model"] in models):
            out[r["item_id"]][r["model"]] = r["answer"]
    return out


def question_items(records: Iterable[Mapping]) -> dict[str, dict]:
    """item_id -> {item_id, persona, stage, kind, question, reference}, one entry per test item."""
    items: dict[str, dict] = {}
    for r in records:
        if r["item_id"] not in items:
            items[r["item_id"]] = {
                k: r[k] for k in ("item_id", "persona", "stage", "kind", "question", "reference")
            }
    return items


async def judge_answers(
    client,
    records: Iterable[Mapping],
    *,
    settings: JudgeSettings = DEFAULT_SETTINGS,
    persona_names: Mapping[str, str] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run steps (a)-(d) with `client` (an `LLMClient`) over answer records of one or more models.

    Args:
        client: `persllm_jax.llm.client.LLMClient` (or anything with its `complete_many` and `stats`).
        records: answer records as for `distinction_bleu`.
        settings: judge sampling and size limits.
        persona_names: persona id -> display name used in prompts (default: the id).
        models: models to judge, in report order (default: all, in first-seen order).
        progress: show tqdm bars.

    Returns:
        ``{"classification", "models": {model: {"knowledge", "attitude", "anti_induction", "ranking",
        "not_scored", "by_persona"}}, "ranking", "parse_counts", "judgments", "client", "settings"}``.
    """
    records = validate_records(records)
    if models is None:
        models = list(dict.fromkeys(r["model"] for r in records))
    items = question_items(records)
    answers = judged_answers(records, models)
    names = dict(persona_names or {})

    def character(item: Mapping) -> str:
        return names.get(item["persona"], item["persona"])

    # Phase 1: everything that does not depend on the classification.
    requests: list[dict] = []
    pending: list[dict] = []

    def ask(messages: list[dict], step: str, max_tokens: int, **meta) -> None:
        requests.append(
            {
                "messages": messages,
                "tag": f"judge/{step}",
                "temperature": settings.temperature,
                "max_tokens": max_tokens,
                "seed": settings.seed,
            }
        )
        pending.append({"step": step, **meta})

    for item_id, item in items.items():
        ask(
            classify_messages(item, character(item), settings),
            "classify",
            settings.label_max_tokens,
            item_id=item_id,
            models=[],
        )
    for item_id, by_model in answers.items():
        item = items[item_id]
        if item["kind"] == "induced":
            for model, answer in by_model.items():
                ask(
                    induction_messages(item, answer, character(item), settings),
                    "induction",
                    settings.yes_no_max_tokens,
                    item_id=item_id,
                    models=[model],
                )
    skipped_ranking = 0
    for item_id, by_model in answers.items():
        present = [m for m in models if m in by_model]
        if len(present) < 2:
            skipped_ranking += 1  # nothing to rank against
            continue
        letters = anonymize(present, item_id, settings.rank_seed)
        texts = {letter: by_model[model] for letter, model in letters.items()}
        ask(
            ranking_messages(items[item_id], texts, character(items[item_id]), settings),
            "rank",
            settings.rank_max_tokens,
            item_id=item_id,
            models=present,
            letters=letters,
        )

    judgments = await _run(client, requests, pending, "judge: classify, induction, rank", progress)
    labels = {j["item_id"]: j["value"] for j in judgments if j["step"] == "classify"}

    # Phase 2: scores, with the rubric of each item's class.
    requests, pending = [], []
    not_scored: dict[str, Counter] = defaultdict(Counter)
    for item_id, by_model in answers.items():
        label = labels.get(item_id)
        for model, answer in by_model.items():
            if label in ("knowledge", "attitude"):
                item = items[item_id]
                ask(
                    score_messages(item, answer, label, character(item), settings),
                    f"score_{label}",
                    settings.score_max_tokens,
                    item_id=item_id,
                    models=[model],
                )
            else:
                not_scored[model]["neither" if label == "neither" else "unlabelled"] += 1
    judgments += await _run(client, requests, pending, "judge: scores", progress)

    for j in judgments:
        j["persona"] = items[j["item_id"]]["persona"]
    personas = {
        model: sorted({items[i]["persona"] for i, by_model in answers.items() if model in by_model})
        for model in models
    }
    summary = summarize_judgments(
        judgments, models, personas=personas, not_scored=not_scored, skipped_ranking=skipped_ranking
    )
    return {
        **summary,
        "judgments": judgments,
        "client": client.stats(),
        "settings": dataclasses.asdict(settings),
    }


async def _run(client, requests: list[dict], pending: list[dict], desc: str, progress: bool) -> list[dict]:
    """Send `requests`, then parse each reply into its `pending` judgment."""
    if not requests:
        return []
    completions = await client.complete_many(requests, progress_desc=desc, progress=progress)
    judgments = []
    for meta, completion in zip(pending, completions):
        judgment = {
            "step": meta["step"],
            "item_id": meta["item_id"],
            "models": list(meta["models"]),
            "ok": completion.ok,
            "reply": completion.text,
            "error": str(completion.error) if completion.error else None,
            "value": None,
        }
        if "letters" in meta:  # kept for auditing which model sat behind which letter
            judgment["letters"] = dict(meta["letters"])
            judgment["ranks"] = {}
        if completion.ok:
            judgment["value"] = _parse(meta, completion.text, judgment)
        judgments.append(judgment)
    return judgments


def parse_model_ranking(text: str | None, letters: Mapping[str, str]) -> list[dict] | None:
    """A ranking reply mapped back from letters to models: [{model, reason, rank}], or None if unreadable."""
    ranking = parse_ranking(text, list(letters))
    if ranking is None:
        return None
    return [{"model": letters[e["model"]], "reason": e["reason"], "rank": e["rank"]} for e in ranking]


def _parse(meta: Mapping, text: str, judgment: dict) -> Any:
    step = meta["step"]
    if step == "classify":
        return parse_label(text)
    if step.startswith("score_"):
        return parse_score(text)
    if step == "induction":
        return parse_yes_no(text)
    entries = parse_model_ranking(text, meta["letters"])
    judgment["ranks"] = {e["model"]: e["rank"] for e in entries or ()}
    return entries


def run_judge(
    records: Iterable[Mapping],
    endpoint: EndpointConfig,
    cache_dir: str | os.PathLike,
    *,
    settings: JudgeSettings = DEFAULT_SETTINGS,
    persona_names: Mapping[str, str] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """`judge_answers` with a fresh `LLMClient` on `endpoint` (the judge), caching under `cache_dir`."""
    from persllm_jax.llm.client import LLMClient

    async def main() -> dict:
        async with LLMClient.from_config(
            endpoint, cache_dir, temperature=settings.temperature, seed=settings.seed
        ) as client:
            return await judge_answers(
                client,
                records,
                settings=settings,
                persona_names=persona_names,
                models=models,
                progress=progress,
            )

    return asyncio.run(main())
