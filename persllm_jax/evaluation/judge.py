"""LLM-judge metrics of PersLLM section 3, through any OpenAI-compatible endpoint.

Four steps, each request cached by `data_builder.llm_client.LLMClient` so that a rerun sends nothing new:

(a) classify every test item (question + reference answer) once, independent of the models, as a Knowledge
    question, an Attitude question or Neither;
(b) score each model's answer against the reference from 0 (conflicting) to 5 (same knowledge / attitude),
    with the rubric the item's class calls for; Neither (and unclassifiable) items are not scored;
(c) anti-induction: for "induced" items (a false premise), ask whether the answer rejects the premise;
(d) ranking: the judge ranks all models' answers to one question against the reference (ties allowed); the
    models appear as letters in a seeded shuffled order so that no model always sits in the same position.

The judged answer of a model is its sample 0 as the item's own persona and stage. Every aggregate reports
`asked`, `parsed`, `unparsed` (a reply the parsers could not read) and `failed` (no reply after retries).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean
from typing import Any

from persllm_jax.evaluation.distinction import is_own, validate_records
from persllm_jax.evaluation.judge_parsing import LABELS, parse_label, parse_ranking, parse_score, parse_yes_no

SYSTEM_PROMPT = "You are a careful, impartial evaluator of role-playing chatbots. Follow the output format."

CLASSIFY_PROMPT = """\
Classify this test question for a chatbot that plays {character}.

Question: {question}
Reference answer by {character}: {reference}

Categories:
- Knowledge question: asks about facts, events, people, places or skills that {character} knows.
- Attitude question: asks for {character}'s opinion, feelings, values or stance on something.
- Neither: small talk or anything else.

Reply with only the category name: Knowledge question, Attitude question, or Neither."""

KNOWLEDGE_RUBRIC = """\
Does the chatbot answer contain the same knowledge as the reference answer?
5 = the same knowledge: the facts of the reference are all there and correct
4 = mostly the same knowledge, a minor detail missing or vague
3 = partly the same, some important facts missing
2 = little of the reference's knowledge
1 = no relevant knowledge (evasive or off topic)
0 = conflicting: it states facts that contradict the reference"""

ATTITUDE_RUBRIC = """\
Does the chatbot answer hold the same attitude (opinion, feeling, stance) as the reference answer?
5 = the same attitude, for the same reasons
4 = the same attitude, reasons differ a little
3 = a similar but weaker or vaguer attitude
2 = a mostly different attitude
1 = no attitude expressed
0 = conflicting: the opposite attitude to the reference"""

SCORE_PROMPT = """\
A chatbot plays {character}. Rate from 0 to 5 how well its answer matches the reference answer written \
as {character}.
{rubric}

Question: {question}
Reference answer: {reference}
Chatbot answer: {answer}

Score (0-5):"""

INDUCTION_PROMPT = """\
A chatbot plays {character}. The question below contains a false premise: it assumes something about \
{character} that is not true. The reference answer shows how {character} rejects it.

Question: {question}
Reference answer: {reference}
Chatbot answer: {answer}

Does the chatbot answer point out or reject the false premise, instead of playing along with it?
Reply with only Yes or No."""

RANKING_PROMPT = """\
Several chatbots play {character}. Rank their answers to the same question by how close each is to the \
reference answer in knowledge accuracy, attitude and speaking style. Rank 1 is the best; answers of equal \
quality may share a rank.

Question: {question}
Reference answer: {reference}

{answers}

Reply with only a JSON list with one object per answer, for example:
[{example}]
Ranking (JSON):"""

ANSWER_BLOCK = "Answer {letter}: {answer}"
CLIP_MARK = " [...]"


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """Sampling and size limits of judge requests (they are part of every cache key)."""

    temperature: float = 0.0
    seed: int | None = 0
    label_max_tokens: int = 32
    score_max_tokens: int = 32
    yes_no_max_tokens: int = 16
    rank_max_tokens: int = 512
    max_answer_chars: int = 2000  # longer answers and references are clipped so prompts stay bounded
    rank_seed: int = 0  # seeds the letter order of each ranked item


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + CLIP_MARK


def _messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def classify_messages(item: Mapping, character: str, settings: JudgeSettings = JudgeSettings()) -> list[dict]:
    """Step (a) request for one test item."""
    return _messages(
        CLASSIFY_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
        )
    )


def score_messages(
    item: Mapping, answer: str, label: str, character: str, settings: JudgeSettings = JudgeSettings()
) -> list[dict]:
    """Step (b) request: `label` ("knowledge" or "attitude") picks the rubric."""
    rubric = {"knowledge": KNOWLEDGE_RUBRIC, "attitude": ATTITUDE_RUBRIC}[label]
    return _messages(
        SCORE_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
            answer=_clip(answer, settings.max_answer_chars),
            rubric=rubric,
        )
    )


def induction_messages(
    item: Mapping, answer: str, character: str, settings: JudgeSettings = JudgeSettings()
) -> list[dict]:
    """Step (c) request for one answer to an induced (false-premise) question."""
    return _messages(
        INDUCTION_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
            answer=_clip(answer, settings.max_answer_chars),
        )
    )


def anonymize(models: Sequence[str], item_id: str, seed: int = 0) -> dict[str, str]:
    """letter -> model for one item: a shuffle seeded by (seed, item_id), the same on every run."""
    if len(models) > len(string.ascii_uppercase):
        raise ValueError(f"can rank at most {len(string.ascii_uppercase)} models at once, got {len(models)}")
    shuffled = list(models)
    random.Random(f"{seed}/{item_id}").shuffle(shuffled)
    return dict(zip(string.ascii_uppercase, shuffled))


def ranking_messages(
    item: Mapping, answers: Mapping[str, str], character: str, settings: JudgeSettings = JudgeSettings()
) -> list[dict]:
    """Step (d) request; `answers` maps letter -> answer text, in letter order."""
    blocks = "\n\n".join(
        ANSWER_BLOCK.format(letter=letter, answer=_clip(text, settings.max_answer_chars))
        for letter, text in answers.items()
    )
    example = ", ".join(f'{{"model": "{letter}", "reason": "...", "rank": N}}' for letter in answers)
    return _messages(
        RANKING_PROMPT.format(
            character=character,
            question=_clip(item["question"], settings.max_answer_chars),
            reference=_clip(item["reference"], settings.max_answer_chars),
            answers=blocks,
            example=example,
        )
    )


# ----- aggregation -----


def count_parsed(judgments: Sequence[Mapping]) -> dict:
    """asked / parsed / unparsed / failed of some judgments (asked = parsed + unparsed + failed)."""
    asked = len(judgments)
    failed = sum(not j["ok"] for j in judgments)
    parsed = sum(j["ok"] and j["value"] is not None for j in judgments)
    return {"asked": asked, "parsed": parsed, "unparsed": asked - parsed - failed, "failed": failed}


def summarize_scores(judgments: Sequence[Mapping]) -> dict:
    """Mean 0-5 score (None if nothing parsed) and histogram of score judgments."""
    values = [j["value"] for j in judgments if j["ok"] and j["value"] is not None]
    histogram = Counter(f"{v:g}" for v in values)
    return {
        "mean": fmean(values) if values else None,
        **count_parsed(judgments),
        "histogram": dict(sorted(histogram.items())),
    }


def summarize_induction(judgments: Sequence[Mapping]) -> dict:
    """Anti-induction rate = yes / judged (None if nothing was judged)."""
    verdicts = [j["value"] for j in judgments if j["ok"] and j["value"] is not None]
    yes = sum(verdicts)
    return {
        "rate": yes / len(verdicts) if verdicts else None,
        "yes": yes,
        "no": len(verdicts) - yes,
        **count_parsed(judgments),
    }


def summarize_ranks(ranks: Sequence[float]) -> dict:
    return {"mean_rank": fmean(ranks) if ranks else None, "n_ranked": len(ranks)}


def _model_summary(judgments: Sequence[Mapping], model: str) -> dict:
    mine = [j for j in judgments if model in j["models"]]
    steps: dict[str, list[Mapping]] = defaultdict(list)
    for j in mine:
        steps[j["step"]].append(j)
    ranks = [
        j["ranks"][model]
        for j in steps["rank"]
        if j["ok"] and j["value"] is not None and j["ranks"].get(model) is not None
    ]
    return {
        "knowledge": summarize_scores(steps["score_knowledge"]),
        "attitude": summarize_scores(steps["score_attitude"]),
        "anti_induction": summarize_induction(steps["induction"]),
        "ranking": summarize_ranks(ranks),
    }


# ----- the judge run -----


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
    settings: JudgeSettings = JudgeSettings(),
    persona_names: Mapping[str, str] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run steps (a)-(d) with `client` (an `LLMClient`) over answer records of one or more models.

    Args:
        client: `data_builder.llm_client.LLMClient` (or anything with its `complete_many` and `stats`).
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
    per_model = {}
    for model in models:
        summary = _model_summary(judgments, model)
        summary["not_scored"] = {
            "neither": not_scored[model]["neither"],
            "unlabelled": not_scored[model]["unlabelled"],
        }
        personas = sorted({items[i]["persona"] for i, by_model in answers.items() if model in by_model})
        summary["by_persona"] = {
            p: _model_summary([j for j in judgments if j["persona"] == p], model) for p in personas
        }
        per_model[model] = summary

    classified = [j for j in judgments if j["step"] == "classify"]
    label_counts = Counter(j["value"] for j in classified if j["ok"] and j["value"] is not None)
    ranked = [j for j in judgments if j["step"] == "rank"]
    ranking = {
        **count_parsed(ranked),
        "skipped_items": skipped_ranking,
        "mean_rank": {m: per_model[m]["ranking"]["mean_rank"] for m in models},
    }
    parse_counts = [{"step": "classify", "model": None, **count_parsed(classified)}]
    for step, key in (
        ("score_knowledge", "knowledge"),
        ("score_attitude", "attitude"),
        ("induction", "anti_induction"),
    ):
        for model in models:
            counts = {k: per_model[model][key][k] for k in ("asked", "parsed", "unparsed", "failed")}
            parse_counts.append({"step": step, "model": model, **counts})
    parse_counts.append({"step": "rank", "model": None, **count_parsed(ranked)})
    return {
        "classification": {
            **count_parsed(classified),
            "counts": {label: label_counts[label] for label in LABELS},
        },
        "models": per_model,
        "ranking": ranking,
        "parse_counts": parse_counts,
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
    *,
    base_url: str,
    model: str,
    cache_dir: str | os.PathLike,
    api_key: str | None = None,
    concurrency: int = 4,
    timeout: float = 300.0,
    max_retries: int = 6,
    settings: JudgeSettings = JudgeSettings(),
    persona_names: Mapping[str, str] | None = None,
    models: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """`judge_answers` with a fresh `LLMClient` on `base_url` (judge `model`), caching under `cache_dir`."""
    from data_builder.llm_client import LLMClient

    async def main() -> dict:
        async with LLMClient(
            base_url,
            model,
            cache_dir,
            api_key=api_key,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
            temperature=settings.temperature,
            seed=settings.seed,
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
