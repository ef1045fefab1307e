"""Evaluation report: report.json (everything), report.md (tables) and PNG plots.

The report's input is one JSON-able dict, best built with `collect_metrics`:

    {"models": {name: {"distinction": distinction_bleu(...)[name] | None,
                       "judge": judge_answers(...)["models"][name] | None,
                       "dpo": {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                               "n_pairs"} | None,
                       "perplexity": {"perplexity", "nll", "n_tokens"} | None}},
     "judge": the rest of judge_answers(...) (classification, ranking, parse_counts, judgments, ...) | None,
     "probes": {"models": {name: ProbeScorer.run(...)}, "meta": the probe set's summary} | None,
     "meta": {free-form: checkpoints, data files, dates}}

Models appear in the order of "models" (e.g. base, SFT, DPO). Any metric may be missing; it shows as "-".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from persllm_jax.train.metrics_log import plot_loss

MISSING = "-"
REFERENCE = "reference"  # the reward cells of the model the DPO rewards are measured against
REPORT_JSON, REPORT_MD = "report.json", "report.md"
DISTINCTION_PNG, TABLE_PNG = "distinction_bleu.png", "comparison_table.png"
PROBES_PNG = "probes_during_training.png"
PROBE_CURVES = ("accuracy", "twin_accuracy", "stage_effect")


def collect_metrics(
    models: Sequence[str],
    *,
    distinction: Mapping[str, Any] | None = None,
    judge: Mapping[str, Any] | None = None,
    dpo: Mapping[str, Any] | None = None,
    perplexity: Mapping[str, Any] | None = None,
    probes: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble the report input from per-step results (each keyed by model name; any may be None)."""

    def pick(source: Mapping | None, model: str) -> Any:
        return None if source is None else source.get(model)

    judge_models = (judge or {}).get("models", {})
    return {
        "models": {
            m: {
                "distinction": pick(distinction, m),
                "judge": judge_models.get(m),
                "dpo": pick(dpo, m),
                "perplexity": pick(perplexity, m),
            }
            for m in models
        },
        "judge": None if judge is None else {k: v for k, v in judge.items() if k != "models"},
        "probes": None if probes is None else dict(probes),
        "meta": dict(meta or {}),
    }


def get(obj: Any, *path: str) -> Any:
    """obj[path[0]][path[1]]..., or None where any level is missing."""
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def fmt(value: Any, spec: str = ".2f") -> str:
    """A number formatted with `spec`; "-" for None, NaN or a non-number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return MISSING
    if spec.endswith("d"):
        if isinstance(value, float) and not value.is_integer():
            return MISSING
        value = int(value)
    return format(value, spec)


# (header, value getter on one model's metrics, format spec, getter of how many items the value
# rests on (judge aggregates), whether the reference model's own value is shown as "reference")
@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Mapping], Any]
    spec: str
    count: Callable[[Mapping], Any] | None = None
    reward: bool = False  # a reward of the DPO metrics: zero by definition for the reference itself


def _judged(*path: str) -> Callable[[Mapping], Any]:
    return lambda m: get(m, "judge", *path, "parsed")


# The judge's aggregates, of a whole model or of one persona, each with the judgments it rests on.
JUDGE_COLUMNS: list[Column] = [
    Column(
        "Anti-induction",
        lambda m: get(m, "judge", "anti_induction", "rate"),
        ".3f",
        _judged("anti_induction"),
    ),
    Column("Knowledge (0-5)", lambda m: get(m, "judge", "knowledge", "mean"), ".2f", _judged("knowledge")),
    Column("Attitude (0-5)", lambda m: get(m, "judge", "attitude", "mean"), ".2f", _judged("attitude")),
    Column(
        "Mean rank",
        lambda m: get(m, "judge", "ranking", "mean_rank"),
        ".2f",
        lambda m: get(m, "judge", "ranking", "n_ranked"),
    ),
]
COMPARISON_COLUMNS: list[Column] = [
    Column("Intra BLEU", lambda m: get(m, "distinction", "average", "intra"), ".2f"),
    Column("Stage BLEU", lambda m: get(m, "distinction", "average", "stage"), ".2f"),
    Column("Inter BLEU", lambda m: get(m, "distinction", "average", "inter"), ".2f"),
    Column("Reward acc.", lambda m: get(m, "dpo", "reward_accuracy"), ".3f", reward=True),
    Column("Reward margin", lambda m: get(m, "dpo", "reward_margin"), ".3f", reward=True),
    Column("Perplexity", lambda m: get(m, "perplexity", "perplexity"), ".2f"),
    *JUDGE_COLUMNS,
]
PERSONA_COLUMNS: list[Column] = [
    Column("Items", lambda p: get(p, "distinction", "n_items"), "d"),
    Column("Intra BLEU", lambda p: get(p, "distinction", "intra"), ".2f"),
    Column("Stage BLEU", lambda p: get(p, "distinction", "stage"), ".2f"),
    Column("Inter BLEU", lambda p: get(p, "distinction", "inter"), ".2f"),
    *JUDGE_COLUMNS,
]
DETAIL_COLUMNS: list[Column] = [
    Column("Pairs", lambda m: get(m, "dpo", "n_pairs"), "d"),
    Column("Chosen reward", lambda m: get(m, "dpo", "chosen_reward"), ".3f", reward=True),
    Column("Rejected reward", lambda m: get(m, "dpo", "rejected_reward"), ".3f", reward=True),
    Column("NLL", lambda m: get(m, "perplexity", "nll"), ".4f"),
    Column("Tokens", lambda m: get(m, "perplexity", "n_tokens"), "d"),
    Column("Items ranked", lambda m: get(m, "judge", "ranking", "n_ranked"), "d"),
]


def cell(name: str, values: Mapping, column: Column) -> str:
    """One formatted cell: "reference" for the DPO reference's own rewards (zero by definition),
    and a judge aggregate with the number of parsed judgments it rests on, `3.50 (n=4)`."""
    if column.reward and get(values, "dpo", "reference") == name:
        return REFERENCE
    text = fmt(column.value(values), column.spec)
    count = column.count(values) if column.count else None
    if text != MISSING and isinstance(count, int):
        text += f" (n={count})"
    return text


def table_rows(rows: Mapping[str, Mapping], columns: Sequence[Column]) -> list[list[str]]:
    """Formatted cells: one row per entry of `rows`, name first."""
    return [[name] + [cell(name, values, c) for c in columns] for name, values in rows.items()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def persona_metrics(model_metrics: Mapping) -> dict[str, dict]:
    """persona -> {"distinction": ..., "judge": ...} for one model."""
    distinction = get(model_metrics, "distinction", "personas") or {}
    judge = get(model_metrics, "judge", "by_persona") or {}
    return {
        p: {"distinction": distinction.get(p), "judge": judge.get(p)} for p in sorted({*distinction, *judge})
    }


def comparison_table(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the model comparison table."""
    header = ["Model"] + [c.header for c in COMPARISON_COLUMNS]
    return header, table_rows(metrics.get("models", {}), COMPARISON_COLUMNS)


def render_markdown(metrics: Mapping, title: str, images: Mapping[str, str]) -> str:
    models = metrics.get("models", {})
    parts = [f"# {title}", ""]
    # The probes come first: they say whether the models became the personas (base, SFT and DPO
    # side by side, with intervals), without a judge; BLEU and the judge follow.
    if metrics.get("probes"):
        from persllm_jax.evaluation.probes.run import markdown_section

        parts += markdown_section(metrics["probes"])
    if "probes_curve" in images:
        parts += [
            "Persona probes at each evaluation of the training runs (eval.every_steps):",
            "",
            f"![Persona probes during training]({images['probes_curve']})",
            "",
        ]
    parts += ["## Model comparison", ""]
    parts += [markdown_table(*comparison_table(metrics)), ""]
    parts += [
        "BLEU is sacrebleu corpus BLEU (0-100): Intra between two samples of one persona and stage (higher = "
        "more self-consistent), Stage between stages of one persona and Inter between personas (lower = more "
        "distinct). Knowledge and attitude are judge scores from 0 (conflicting) to 5 (same as the reference); "
        "anti-induction is the share of false-premise questions whose false premise the answer rejects; mean "
        "rank is the judge's rank among the compared models (1 = best). Each judge figure is followed by the "
        "number of parsed judgments it rests on (n). Rewards are beta times a model's log-probability ratio "
        'to the reference model, so the reference\'s own reward cells read "reference".',
        "",
    ]
    if any(get(m, "dpo") or get(m, "perplexity") for m in models.values()):
        parts += [
            "### Details",
            "",
            markdown_table(
                ["Model"] + [c.header for c in DETAIL_COLUMNS], table_rows(models, DETAIL_COLUMNS)
            ),
            "",
        ]
    parts += dpo_by_source_section(models)
    for key, caption in (("table", "Comparison table"), ("distinction", "Distinction BLEU per persona")):
        if key in images:
            parts += [f"![{caption}]({images[key]})", ""]
    personas_by_model = {name: persona_metrics(m) for name, m in models.items()}
    if any(personas_by_model.values()):
        parts += ["## Per persona", ""]
        for name, personas in personas_by_model.items():
            if personas:
                header = ["Persona"] + [c.header for c in PERSONA_COLUMNS]
                parts += [
                    f"### {name}",
                    "",
                    markdown_table(header, table_rows(personas, PERSONA_COLUMNS)),
                    "",
                ]
    parts += judge_section(metrics.get("judge"))
    losses = {k: v for k, v in images.items() if k.startswith("loss:")}
    if losses:
        parts += ["## Training loss", ""]
        parts += [f"![{key[len('loss:') :]} loss]({path})\n" for key, path in losses.items()]
    return "\n".join(parts).rstrip() + "\n"


def dpo_by_source_section(models: Mapping) -> list[str]:
    rows = [
        [
            name,
            source,
            fmt(v.get("reward_accuracy"), ".3f"),
            fmt(v.get("reward_margin"), ".3f"),
            fmt(v.get("preference_accuracy"), ".3f"),
            fmt(v.get("n_pairs"), "d"),
        ]
        for name, m in models.items()
        for source, v in (get(m, "dpo", "by_source") or {}).items()
    ]
    if not rows:
        return []
    header = ["Model", "Pair source", "Reward acc.", "Reward margin", "Preference acc.", "Pairs"]
    return ["### DPO metrics by pair source", "", markdown_table(header, rows), ""]


def judge_section(judge: Mapping | None) -> list[str]:
    if not judge:
        return []
    parts = ["## Judge parse counts", ""]
    rows = [
        [row.get("step"), row.get("model") or "all"]
        + [fmt(row.get(k), "d") for k in ("asked", "parsed", "unparsed", "failed")]
        for row in judge.get("parse_counts", [])
    ]
    parts += [markdown_table(["Step", "Model", "Asked", "Parsed", "Unparsed", "Failed"], rows), ""]
    counts = get(judge, "classification", "counts")
    if counts:
        parts += ["Question classes: " + ", ".join(f"{label} {n}" for label, n in counts.items()), ""]
    client = judge.get("client")
    if client:
        parts += [
            f"Judge requests sent: {client.get('requests_sent', MISSING)}, answered from cache: "
            f"{client.get('cache_hits', MISSING)}, failed: {client.get('failures', MISSING)}.",
            "",
        ]
    return parts


# ----- plots -----


def _figure(width: float, height: float):
    # A bare Figure renders with Agg and leaves pyplot's global backend and state alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_distinction(metrics: Mapping, out_png: Path) -> Path | None:
    """Grouped bars of Intra/Stage/Inter BLEU: personas (and the average) on x, one bar per model."""
    models = {
        name: m["distinction"] for name, m in metrics.get("models", {}).items() if get(m, "distinction")
    }
    if not models:
        return None
    personas = sorted({p for d in models.values() for p in d.get("personas", {})})
    groups = personas + ["average"]
    fig = _figure(max(9.0, 1.3 * len(groups) * 3), 3.8)
    axes = fig.subplots(1, 3, squeeze=False)[0]
    width = 0.8 / len(models)
    for ax, metric in zip(axes, ("intra", "stage", "inter")):
        for k, (name, distinction) in enumerate(models.items()):
            values = [
                get(distinction, "average", metric)
                if g == "average"
                else get(distinction, "personas", g, metric)
                for g in groups
            ]
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(groups))]
            present = [(x, v) for x, v in zip(xs, values) if isinstance(v, (int, float)) and math.isfinite(v)]
            ax.bar([x for x, _ in present], [v for _, v in present], width=width, label=name)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_title(f"{metric.capitalize()} BLEU")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("BLEU (0-100)")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_probe_curves(runs: Mapping[str, Path], out_png: Path) -> Path | None:
    """Probe accuracy, twin accuracy and stage effect against step, a line per training run; None
    when no run evaluated probes."""
    from persllm_jax.train.metrics_log import read_metrics

    curves = {}
    for name, path in runs.items():
        records = [r for r in (read_metrics(path) if path.exists() else []) if "eval/probes/accuracy" in r]
        if records:
            curves[name] = records
    if not curves:
        return None
    fig = _figure(5.0 * len(PROBE_CURVES), 3.6)
    axes = fig.subplots(1, len(PROBE_CURVES))
    for ax, key in zip(axes, PROBE_CURVES):
        for name, records in curves.items():
            points = [
                (r["step"], r[f"eval/probes/{key}"])
                for r in records
                if r.get(f"eval/probes/{key}") is not None
            ]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_ylim(*((-1.05, 1.05) if key == "stage_effect" else (-0.05, 1.05)))  # the metric's whole range
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Persona probes during training")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_table(header: Sequence[str], rows: Sequence[Sequence[str]], out_png: Path, title: str) -> Path:
    """A table of formatted cells rendered as a PNG."""
    fig = _figure(max(6.0, 1.25 * len(header)), 0.9 + 0.4 * (len(rows) + 1))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(
        cellText=[list(r) for r in rows] or [[MISSING] * len(header)],
        colLabels=list(header),
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.4)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=130, bbox_inches="tight")
    return out_png


# ----- writing -----


def to_jsonable(value: Any) -> Any:
    """`value` with tuples as lists, paths as strings, numpy/JAX scalars as numbers and NaN/inf as None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy / JAX scalars
        return to_jsonable(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to report.json: {value!r}")


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    *,
    run_dirs: Mapping[str, str | Path] | None = None,
    title: str = "PersLLM evaluation",
) -> dict[str, Path]:
    """Write report.json, report.md and PNGs into `out_dir`.

    Args:
        out_dir: created if needed.
        metrics: the report input (see the module docstring and `collect_metrics`).
        run_dirs: training run name -> run directory whose metrics.jsonl gives a loss curve.
        title: the report's heading.

    Returns:
        What was written: {"json", "md", "table", "distinction", "loss:<run>"...} -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(metrics)
    written: dict[str, Path] = {}
    header, rows = comparison_table(data)
    if rows:
        written["table"] = plot_table(header, rows, out / TABLE_PNG, title)
    distinction_png = plot_distinction(data, out / DISTINCTION_PNG)
    if distinction_png:
        written["distinction"] = distinction_png
    probes_png = plot_probe_curves(
        {name: Path(run_dir) / "metrics.jsonl" for name, run_dir in (run_dirs or {}).items()},
        out / PROBES_PNG,
    )
    if probes_png:
        written["probes_curve"] = probes_png
    for name, run_dir in (run_dirs or {}).items():
        run = Path(run_dir).resolve()
        png = plot_loss(
            run / "metrics.jsonl",
            out / f"loss_{_file_name(name)}.png",
            f"{name}: training loss of run {run.parent.name}/{run.name}",
        )
        if png:
            written[f"loss:{name}"] = Path(png)
    images = {key: path.name for key, path in written.items()}
    (out / REPORT_MD).write_text(render_markdown(data, title, images))
    written["md"] = out / REPORT_MD
    report = {
        **data,
        "report": {
            "title": title,
            "run_dirs": {k: str(v) for k, v in (run_dirs or {}).items()},
            "files": {key: path.name for key, path in written.items()} | {"json": REPORT_JSON},
        },
    }
    tmp = out / (REPORT_JSON + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp.replace(out / REPORT_JSON)  # a reader never sees half a report
    written["json"] = out / REPORT_JSON
    return written
