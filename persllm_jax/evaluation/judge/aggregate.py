"""From single judgments to the judge's metrics: mean scores, anti-induction rates, mean ranks, and how many
requests were asked, parsed, unparsed (a reply the parsers could not read) and failed (no reply after
retries), per model, per persona and per judging step.

A judgment is a dict with `step`, `item_id`, `models`, `persona`, `ok` and the parsed `value` (None when
unparsed); a ranking judgment also has `ranks` (model -> rank).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from statistics import fmean

from persllm_jax.evaluation.judge.parsing import LABELS

COUNT_KEYS = ("asked", "parsed", "unparsed", "failed")


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


def model_summary(judgments: Sequence[Mapping], model: str) -> dict:
    """knowledge, attitude, anti_induction and ranking of one model over the judgments that concern it."""
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


def summarize_judgments(
    judgments: Sequence[Mapping],
    models: Sequence[str],
    *,
    personas: Mapping[str, Sequence[str]],
    not_scored: Mapping[str, Counter],
    skipped_ranking: int,
) -> dict:
    """The judge's results but for the raw judgments: ``{"classification", "models", "ranking",
    "parse_counts"}``.

    Args:
        judgments: every judgment of the run, each with its item's `persona`.
        models: the judged models, in report order.
        personas: model -> the personas whose items it answered (one `by_persona` entry each).
        not_scored: model -> Counter of answers left unscored, by "neither" and "unlabelled".
        skipped_ranking: items with fewer than two answers, so not ranked.
    """
    per_model = {}
    for model in models:
        summary = model_summary(judgments, model)
        unscored = not_scored.get(model) or Counter()
        summary["not_scored"] = {"neither": unscored["neither"], "unlabelled": unscored["unlabelled"]}
        summary["by_persona"] = {
            p: model_summary([j for j in judgments if j["persona"] == p], model) for p in personas[model]
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
            counts = {k: per_model[model][key][k] for k in COUNT_KEYS}
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
    }
