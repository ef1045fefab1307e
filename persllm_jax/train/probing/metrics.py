"""Probe metrics from choice scores: accuracy, twin accuracy, stage effect, with bootstrap intervals.

- accuracy: the share of probes whose best-scoring choice is the answer;
- twin accuracy: the share of twin groups in which every stage's probe is answered right. A model
  that ignores the stage token sees the same input at every stage of a group, picks the same
  choice, and (the answers differing) scores exactly 0;
- stage effect: on twin probes, accuracy with the probe's own stage token minus accuracy when the
  same probe is asked with another stage's token (each other stage of its group, averaged); 0 for a
  model that ignores the token.

Every figure comes with its n and a 95% percentile-bootstrap interval over the units it averages
(probes; twin groups for twin accuracy), from a fixed seed, so a report is reproducible.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from persllm_jax.personas.probes import Probe

BOOTSTRAP_RESAMPLES = 1000


def interval(values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """The mean of `values`, its 95% bootstrap interval and n (value None where n is 0)."""
    x = np.asarray(values, np.float64)
    if not len(x):
        return {"value": None, "ci": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"value": float(x.mean()), "ci": [float(low), float(high)], "n": int(len(x))}


def _breakdown(units: Sequence, value: Callable, keys: Mapping[str, Callable], seed: int) -> dict:
    """`interval` over all units and over each group of every key function."""
    out = {"overall": interval([value(u) for u in units], seed)}
    for name, key in keys.items():
        groups: dict[str, list] = defaultdict(list)
        for unit in units:
            groups[key(unit)].append(value(unit))
        out[f"by_{name}"] = {k: interval(v, seed) for k, v in sorted(groups.items())}
    return out


def twin_groups(probes: Sequence[Probe]) -> dict[str, list[Probe]]:
    """The twin groups of these probes that hold two or more of them (a probe whose twins are not
    among them counts as a plain probe)."""
    groups: dict[str, list[Probe]] = defaultdict(list)
    for p in probes:
        if p.twin is not None:
            groups[p.twin].append(p)
    return {twin: members for twin, members in groups.items() if len(members) > 1}


def pick(scores: Sequence[float]) -> int:
    """The best-scoring choice (the first of equal best)."""
    return int(np.argmax(np.asarray(scores, np.float64)))


def probe_metrics(
    probes: Sequence[Probe],
    mean_scores: Mapping[tuple[str, str], Sequence[float]],
    summed_scores: Mapping[tuple[str, str], Sequence[float]],
    seed: int = 0,
) -> dict:
    """Metrics of one model. `mean_scores[(probe id, stage)]` holds the probe's choice scores with
    `stage`'s token (its own stage, and for twin probes every other stage of its group)."""
    by = {
        "persona": lambda p: p.persona,
        "stage": lambda p: p.stage,
        "category": lambda p: p.category,
    }
    right = {p.id: pick(mean_scores[(p.id, p.stage)]) == p.answer for p in probes}
    right_summed = {p.id: pick(summed_scores[(p.id, p.stage)]) == p.answer for p in probes}
    groups = twin_groups(probes)
    twin_probes = [p for members in groups.values() for p in members]

    def other_token_right(p: Probe) -> float:
        others = [q.stage for q in groups[p.twin] if q.stage != p.stage]
        return float(np.mean([pick(mean_scores[(p.id, s)]) == p.answer for s in others]))

    group_list = [members for _, members in sorted(groups.items())]
    group_by = {"persona": lambda g: g[0].persona, "category": lambda g: g[0].category}
    return {
        "accuracy": _breakdown(probes, lambda p: float(right[p.id]), by, seed),
        "accuracy_summed": _breakdown(probes, lambda p: float(right_summed[p.id]), by, seed),
        "twin_accuracy": _breakdown(group_list, lambda g: float(all(right[p.id] for p in g)), group_by, seed),
        "stage_effect": _breakdown(
            twin_probes, lambda p: float(right[p.id]) - other_token_right(p), by, seed
        ),
        "chance": float(np.mean([1.0 / len(p.choices) for p in probes])),  # a random pick's accuracy
        "twin_right_token_accuracy": interval([float(right[p.id]) for p in twin_probes], seed),
        "twin_other_token_accuracy": interval([other_token_right(p) for p in twin_probes], seed),
    }


def probe_records(
    probes: Sequence[Probe],
    mean_scores: Mapping[tuple[str, str], Sequence[float]],
    summed_scores: Mapping[tuple[str, str], Sequence[float]],
) -> list[dict]:
    """Per probe: its choices' scores and pick with its own stage token, and with each other stage's."""
    records = []
    for p in probes:
        own = list(map(float, mean_scores[(p.id, p.stage)]))
        record = {
            "id": p.id,
            "scores": own,
            "pick": pick(own),
            "answer": p.answer,
            "scores_summed": list(map(float, summed_scores[(p.id, p.stage)])),
        }
        others = {
            s: list(map(float, v)) for (pid, s), v in mean_scores.items() if pid == p.id and s != p.stage
        }
        if others:
            record["other_stage"] = {s: {"scores": v, "pick": pick(v)} for s, v in sorted(others.items())}
        records.append(record)
    return records
