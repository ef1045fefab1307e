"""`persllm probe` and the probes section of `persllm eval`: each model's probe metrics (scored as
in training, `train/probing`), its persona attribution on held-out dialogues, and the tables."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from persllm_jax.evaluation.answers import TestItem, test_items
from persllm_jax.evaluation.probes.attribution import attribution
from persllm_jax.personas.materials import Persona, load_personas
from persllm_jax.personas.probes import PROBES_FILE, Probe, persona_probe_files, read_probes
from persllm_jax.train.probing.metrics import twin_groups
from persllm_jax.train.probing.scorer import ProbeScorer

log = logging.getLogger(__name__)


def score_model(
    scorer: ProbeScorer, state, items: Sequence[TestItem] = (), with_records: bool = True
) -> dict:
    """The probe metrics of one model and, with held-out items, its persona and stage attribution."""
    out = scorer.run(state, with_records=with_records)
    out["attribution"] = (
        attribution(scorer.replies, state, items, scorer.personas, scorer.seed) if items else None
    )
    return out


def probe_set_summary(probes: Sequence[Probe], files: Sequence[str | Path]) -> dict:
    twins = twin_groups(probes)
    categories: dict[str, int] = {}
    for p in probes:
        categories[p.category] = categories.get(p.category, 0) + 1
    return {
        "files": [str(f) for f in files],
        "probes": len(probes),
        "twin_groups": len(twins),
        "personas": sorted({p.persona for p in probes}),
        "categories": dict(sorted(categories.items())),
    }


def held_out_items(
    dialogues: str | Path | None, split: str, personas: Mapping[str, Persona]
) -> list[TestItem]:
    """The persona questions of the dialogues' held-out split (none without a file)."""
    if not dialogues:
        return []
    from persllm_jax.data.readers import read_records

    return test_items(read_records(dialogues, split=split or None), dict(personas))


def probe_models(
    models: Sequence[tuple[str, str]],
    probe_files: Sequence[str | Path] = (),
    personas_dir: str | Path = "examples/personas",
    dialogues: str | Path | None = None,
    split: str = "test",
    dtype: str = "float32",
    seed: int = 0,
    probe_set: str = PROBES_FILE,
) -> dict:
    """`persllm probe`: every model on the probes (default: the `probe_set` file of each persona's
    folder)."""
    import jax.numpy as jnp

    from persllm_jax.io import pretrained

    started = time.time()
    personas = {p.id: p for p in load_personas(personas_dir)}
    files = list(probe_files) or persona_probe_files(personas_dir, personas, probe_set)
    if not files:
        raise ValueError(f"no probe files given, and no persona in {personas_dir} has a {probe_set}")
    probes = read_probes(files, personas.values())
    items = held_out_items(dialogues, split, personas)
    results = {}
    for name, path in models:
        began = time.time()
        model, tokenizer = pretrained.load_pretrained(path, dtype=jnp.dtype(dtype))
        scorer, state = ProbeScorer.for_model(model, tokenizer, probes, personas, seed)
        results[name] = {"path": str(path), **score_model(scorer, state, items)}
        log.info(
            "probe: %s: accuracy %.3f, twin accuracy %.3f, stage effect %+.3f (%.1f s)",
            name,
            results[name]["accuracy"]["overall"]["value"],
            results[name]["twin_accuracy"]["overall"]["value"] or 0.0,
            results[name]["stage_effect"]["overall"]["value"] or 0.0,
            time.time() - began,
        )
        del model, scorer, state
        gc.collect()
    meta = {
        **probe_set_summary(probes, files),
        "held_out_dialogues": len(items),
        "dialogues": str(dialogues) if dialogues else None,
        "seed": seed,
        "wall_time_s": round(time.time() - started, 1),
    }
    return {"models": results, "meta": meta}


# -- tables ------------------------------------------------------------------------------------


def _stat(stat: Mapping | None, signed: bool = False) -> str:
    if not stat or stat.get("value") is None:
        return "-"
    spec = "+.2f" if signed else ".2f"
    low, high = stat["ci"]
    return f"{stat['value']:{spec}} [{low:{spec}}, {high:{spec}}] n={stat['n']}"


def _attribution_cell(result: Mapping, name: str) -> str:
    att = (result.get("attribution") or {}).get(name)
    if not att or att["top1"]["value"] is None:
        return "-"
    return f"{_stat(att['top1'])} (chance {att['chance']:.2f}, rank {att['mean_rank']:.2f})"


def markdown_section(result: Mapping, heading: str = "## Persona probes") -> list[str]:
    """The probes part of a report: the overall table, then accuracy by category and by persona."""
    models, meta = result["models"], result["meta"]
    lines = [
        heading,
        "",
        f"{meta['probes']} probes ({meta['twin_groups']} twin groups) of {', '.join(meta['personas'])}; "
        "a choice's score is the mean log-probability of its tokens as the persona's reply (end-of-turn "
        "marker excluded); the pick is the best score. Each figure: value [95% bootstrap interval] and n. "
        "Twin accuracy is 0 and stage effect 0 for a model that ignores the stage token. Attribution: how "
        f"often a held-out reply ({meta.get('held_out_dialogues', 0)}) is most likely under its own persona "
        "(or stage) among all.",
        "",
        f"| model | accuracy (chance {next(iter(models.values()))['chance']:.2f}) | accuracy (summed log-prob) | "
        "twin accuracy | stage effect | persona attribution | stage attribution |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in models.items():
        lines.append(
            f"| {name} | {_stat(r['accuracy']['overall'])} | {_stat(r['accuracy_summed']['overall'])} | "
            f"{_stat(r['twin_accuracy']['overall'])} | {_stat(r['stage_effect']['overall'], signed=True)} | "
            f"{_attribution_cell(r, 'persona')} | {_attribution_cell(r, 'stage')} |"
        )
    for key, title in (("by_category", "category"), ("by_persona", "persona"), ("by_stage", "stage")):
        groups = sorted({g for r in models.values() for g in r["accuracy"][key]})
        lines += [
            "",
            f"Accuracy by {title}:",
            "",
            "| model | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        for name, r in models.items():
            cells = [_stat(r["accuracy"][key].get(g)) for g in groups]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_outputs(result: Mapping, json_path: str | Path | None, markdown_path: str | Path | None) -> None:
    import json

    from persllm_jax.evaluation.report import to_jsonable

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(to_jsonable(result), indent=1) + "\n")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(
            "\n".join(["# Persona probes", "", *markdown_section(result, "## Results")])
        )


def accuracy_line(name: str, r: Mapping) -> str:
    """One model's headline probe figures on one line."""

    def value(stat, spec=".3f"):
        return "-" if stat["value"] is None else f"{stat['value']:{spec}}"

    return (
        f"{name}: accuracy {value(r['accuracy']['overall'])} (n={r['accuracy']['overall']['n']}), "
        f"twin accuracy {value(r['twin_accuracy']['overall'])}, "
        f"stage effect {value(r['stage_effect']['overall'], '+.3f')}"
    )


def report_probe_lines(report_json: str | Path) -> list[str]:
    """`accuracy_line` of each model in an eval report's probes section (none without one)."""
    import json

    path = Path(report_json)
    probes = (json.loads(path.read_text()).get("probes") or {}) if path.exists() else {}
    return [accuracy_line(name, r) for name, r in (probes.get("models") or {}).items()]
