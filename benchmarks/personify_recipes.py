"""Which training recipe personifies a small model: SFT and DPO variants from one base model and one
build's data, each measured with the persona probes.

For every variant: the build is redone from the given build's LLM cache (no annotator request; only
the persona prompt style and the pair options change), SFT then DPO run as the demo runs them
(`persllm sft` / `persllm dpo` with the demo's configs and the variant's overrides), and
`persllm probe` scores base, SFT and DPO on

- the shipped probe files (never trained on): accuracy, false-premise accuracy, knowledge and
  identity accuracy, twin accuracy, stage effect; and persona attribution of the build's held-out
  dialogues;
- the independent probe files (`probes_independent.jsonl`, written from the materials alone, apart
  from the first set and the reference dialogues): the same metrics, but attribution;
- the variant's own training twins: each question of the reference dialogues asked at both stages
  whose group is in the train split, as a two-choice twin probe (its two stages' answers). The
  cheapest signal: a recipe that cannot separate the twins it trained on will not separate new ones.

    python benchmarks/personify_recipes.py --run runs/demo --out runs/recipes
    python benchmarks/personify_recipes.py --run runs/demo --out runs/recipes --variants when_lr3e-4

`--run` is a finished demo run (its base_model, data with the LLM cache, configs, and for the
`demo_run` variants its sft and dpo runs). Results:
`<out>/results.json` (every metric of every model of every variant, and wall times) and
`<out>/results.md` (the tables: the first probe sets and training twins, then the independent sets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from personify_variants import VARIANTS  # noqa: E402

from persllm_jax.personas.probes import INDEPENDENT_PROBES_FILE  # noqa: E402


def persllm(*args: str, log: Path) -> float:
    started = time.time()
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "persllm_jax.cli", *args], stdout=f, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise SystemExit(f"persllm {args[0]} failed ({done.returncode}); see {log}")
    return round(time.time() - started, 1)


def personas_in(style: str, out: Path) -> Path:
    """The example personas with `stage_prompt: style` (a copy unless it is the default)."""
    source = ROOT / "examples" / "personas"
    if style == "token":
        return source
    target = out / f"personas_{style}"
    if not target.is_dir():
        shutil.copytree(source, target)
        for path in target.glob("*/persona.yaml"):
            text = path.read_text()
            path.write_text(text.replace("\nstages:", f"\nstage_prompt: {style}\nstages:", 1))
    return target


def build(run: Path, out: Path, personas: Path, overrides: list[str]) -> Path:
    data = out / "data"
    if not (data / "dialogues.jsonl").is_file():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        shutil.copytree(run / "data" / "cache", data / "cache")
        config = yaml.safe_load((run / "configs" / "build-data.yaml").read_text())
        config.update(personas_dir=str(personas), out_dir=str(data))
        (out / "build-data.yaml").write_text(yaml.safe_dump(config))
        persllm(
            "build-data", "--config", str(out / "build-data.yaml"), *overrides, log=out / "build-data.log"
        )
    return data


def train(
    run: Path,
    step: str,
    out: Path,
    model: Path,
    sources: list[tuple[Path, float | None]],
    overrides: list[str],
) -> float:
    """`persllm <step>` from `model` on `sources` ((file, repeats) each, the train split; repeats
    None: the run's config's)."""
    run_dir = out / step
    if (run_dir / "done.json").is_file():
        return json.loads((run_dir / "done.json").read_text())["seconds"]
    shutil.rmtree(run_dir, ignore_errors=True)
    config = yaml.safe_load((run / "configs" / f"{step}.yaml").read_text())
    config["run_dir"] = str(run_dir)
    config["model"]["path"] = str(model)
    config["data"]["sources"] = [
        {**config["data"]["sources"][0], "path": str(path), **({"repeats": r} if r is not None else {})}
        for path, r in sources
    ]
    config["eval"] = {"every_steps": 0}
    (out / f"{step}.yaml").write_text(yaml.safe_dump(config))
    seconds = persllm(step, "--config", str(out / f"{step}.yaml"), *overrides, log=out / f"{step}.log")
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def materials_source(personas: Path, out: Path) -> Path:
    """Every materials paragraph of every persona and stage as a string prompt/completion record:
    the stage's system prompt, then the paragraph (the loss on the paragraph alone). Plain text,
    not a chat turn: the knowledge and experiences files speak of the person in the third person,
    and the model is not to answer so."""
    from persllm_jax.personas.materials import load_personas
    from persllm_jax.personas.prompts import system_prompt

    path = out / "materials.jsonl"
    with open(path, "w") as f:
        for persona in load_personas(personas):
            for stage in persona.stages:
                prompt = system_prompt(persona, stage) + "\n\n"
                for paragraph in stage.paragraphs:
                    record = {
                        "id": paragraph.id,
                        "prompt": prompt,
                        "completion": paragraph.text,
                        "split": "train",
                    }
                    f.write(json.dumps(record) + "\n")
    return path


def _max_steps(run: Path, out: Path, step: str) -> int:
    """`train.max_steps` of the variant's own run of `step`, or the demo run's."""
    config = (
        out / step / "config.yaml" if (out / step / "config.yaml").is_file() else run / step / "config.yaml"
    )
    return yaml.safe_load(config.read_text())["train"]["max_steps"]


def _step_seconds(run: Path, step: str) -> float:
    """How long the demo run's own step took (its pipeline record)."""
    return json.loads((run / "steps" / f"{step}.json").read_text())["seconds"]


def training_twins(data: Path, out: Path) -> Path:
    """A probe file of the train split's questions asked at both stages (two choices each)."""
    groups: dict[str, list[dict]] = {}
    for line in (data / "dialogues.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train" and "/ref/" in row["id"]:
            groups.setdefault(row["messages"][1]["content"] + "\0" + row["persona"], []).append(row)
    probes = []
    for number, rows in enumerate(v for v in groups.values() if len({r["stage"] for r in v}) == 2):
        rows = sorted(rows, key=lambda r: r["stage"])[:2]
        answers = [r["messages"][2]["content"] for r in rows]
        for index, row in enumerate(rows):
            _, stage, kind, paragraph = row["seed_id"].split("/")
            probes.append(
                {
                    "id": f"train-twin-{number:03d}-{row['stage']}",
                    "persona": row["persona"],
                    "stage": row["stage"],
                    "category": "temporal",
                    "question": row["messages"][1]["content"],
                    "choices": answers,
                    "answer": index,
                    "twin": f"train-twin-{number:03d}",
                    "source": f"{stage}/{kind}.txt#{int(paragraph)}",
                }
            )
    path = out / "training_twins.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probes))
    return path


def summary(metrics: dict) -> dict:
    def value(*keys):
        node = metrics
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return None if node is None else round(node["value"], 3)

    knowledge = [metrics["accuracy"]["by_category"].get(c) for c in ("knowledge", "identity")]
    n = sum(k["n"] for k in knowledge if k)
    return {
        "accuracy": value("accuracy", "overall"),
        "false_premise": value("accuracy", "by_category", "false_premise"),
        "knowledge_identity": round(sum(k["value"] * k["n"] for k in knowledge if k) / n, 3) if n else None,
        "twin_accuracy": value("twin_accuracy", "overall"),
        "stage_effect": value("stage_effect", "overall"),
        "persona_attribution": value("attribution", "persona", "top1"),
        "stage_attribution": value("attribution", "stage", "top1"),
    }


def probe(models: dict[str, Path], personas: Path, out: Path, name: str, extra: list[str]) -> dict:
    path = out / f"probes_{name}.json"
    if not path.is_file():
        args = [f"{k}={v}" for k, v in models.items()]
        persllm(
            "probe",
            *args,
            "--personas-dir",
            str(personas),
            "--json",
            str(path),
            *extra,
            log=out / f"probe_{name}.log",
        )
    return json.loads(path.read_text())


def probe_shared(
    models: dict[str, Path], personas: Path, out: Path, root: Path, name: str, extra: list[str]
) -> dict:
    """`probe` of the variant's own models (under `out`); a model from elsewhere (the base model,
    the demo run's SFT, another variant's) is scored once for every variant that asks it with the
    same persona prompt and the same probes and held-out data."""
    found = out / f"probes_{name}.json"
    if found.is_file() and set(models) <= set(json.loads(found.read_text())["models"]):
        return json.loads(found.read_text())
    own = {k: v for k, v in models.items() if v.resolve().is_relative_to(out.resolve())}
    scored = probe(own, personas, out, name, extra)["models"] if own else {}
    inputs = [str(personas), *(Path(e).read_text() if Path(e).is_file() else e for e in extra)]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:12]
    for label, path in models.items():
        if label in own:
            continue
        # the model's directory and its files' times: a model trained again there is scored again
        identity = [str(path.resolve()), *(f"{f}:{f.stat().st_mtime_ns}" for f in sorted(path.rglob("*")))]
        shared = f"{label}_{name}_{key}_" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:8]
        scored[label] = probe({label: path}, personas, root, shared, extra)["models"][label]
    return {"models": {label: scored[label] for label in models}}


def data_of(run: Path, root: Path, name: str, spec: dict) -> Path:
    """Variant `name`'s build, or the one its `data_from` names (made if missing, nothing
    trained), for `spec`, which must ask with the same persona prompt."""
    other = VARIANTS[name]
    if other["stage_prompt"] != spec["stage_prompt"]:
        raise SystemExit(
            f"{name} builds with stage_prompt {other['stage_prompt']}, not {spec['stage_prompt']}"
        )
    if other.get("data_from"):
        return data_of(run, root, other["data_from"], spec)
    (root / name).mkdir(parents=True, exist_ok=True)
    return build(run, root / name, personas_in(other["stage_prompt"], root), other["build"])


def run_variant(run: Path, root: Path, name: str, spec: dict) -> dict:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    personas = personas_in(spec["stage_prompt"], root)
    # its own build, or the one `data_from` names (the same dialogues and split; its pairs may differ)
    data = data_of(run, root, name, spec)
    # DPO on other variants' pair files, each `repeats` times an epoch, or on this build's
    pair_sources = [
        (data_of(run, root, v, spec) / "pairs.jsonl", r) for v, r in spec.get("pairs_from", {}).items()
    ]
    pair_sources = pair_sources or [(data / "pairs.jsonl", None)]
    from_run = spec.get("from_run", [])
    if from_run and not spec.get("build", True):
        # the run's models are scored on the split they were trained with
        for name in ("dialogues.jsonl", "pairs.jsonl"):
            if (data / name).read_bytes() != (run / "data" / name).read_bytes():
                raise SystemExit(f"the rebuilt {data / name} differs from the run's {run / 'data' / name}")
    if "sft" in from_run:
        sft_dir, sft_seconds = run / "sft", _step_seconds(run, "sft")
    elif spec.get("sft_from"):
        sft_seconds = run_variant(run, root, spec["sft_from"], VARIANTS[spec["sft_from"]])["seconds"]["sft"]
        sft_dir = root / spec["sft_from"] / "sft"
    else:
        sft_dir = out / "sft"
        sources = [(data / "dialogues.jsonl", None)]
        if spec.get("materials_repeats"):
            sources.append((materials_source(personas, out), spec["materials_repeats"]))
        sft_seconds = train(run, "sft", out, run / "base_model", sources, spec["sft"])
    if "dpo" in from_run:
        dpo_dir, dpo_seconds = run / "dpo", _step_seconds(run, "dpo")
    elif spec.get("dpo_from"):
        # a second DPO from another variant's DPO model (its reference that model)
        first = run_variant(run, root, spec["dpo_from"], VARIANTS[spec["dpo_from"]])
        dpo_dir = out / "dpo"
        second = train(run, "dpo", out, root / spec["dpo_from"] / "dpo", pair_sources, spec["dpo"])
        dpo_seconds = first["seconds"]["dpo"] + second
    else:
        dpo_dir = out / "dpo"
        overrides = spec["dpo"]
        if spec.get("on_policy"):
            # the SFT model's own answers as rejected ones, beside the build's pairs (sampled by
            # `persllm dpo` before its first step; its seconds count in DPO's)
            overrides = [
                *overrides,
                f"dpo.on_policy.dialogues={data / 'dialogues.jsonl'}",
                *(f"dpo.on_policy.{k}={v}" for k, v in spec["on_policy"].items()),
            ]
        dpo_seconds = train(run, "dpo", out, sft_dir, pair_sources, overrides)
    models = {"base": run / "base_model", "sft": sft_dir, "dpo": dpo_dir}
    held_out = probe_shared(
        models, personas, out, root, "held_out", ["--dialogues", str(data / "dialogues.jsonl")]
    )
    twins = probe_shared(
        models, personas, out, root, "training_twins", ["--probes", str(training_twins(data, out))]
    )
    independent_files = sorted((ROOT / "examples" / "personas").glob(f"*/{INDEPENDENT_PROBES_FILE}"))
    independent = probe_shared(
        models,
        personas,
        out,
        root,
        "independent",
        [a for f in independent_files for a in ("--probes", str(f))],
    )
    result = {
        "spec": spec,
        "seconds": {"sft": sft_seconds, "dpo": dpo_seconds},
        "steps": {step: _max_steps(run, out, step) for step in ("sft", "dpo")},
        **({"first_dpo": spec["dpo_from"]} if spec.get("dpo_from") else {}),
        # the pipeline's step time includes its probes during training (`eval.every_steps`)
        "seconds_from_run": list(from_run),
        "held_out": {m: summary(held_out["models"][m]) for m in models},
        "training_twins": {m: summary(twins["models"][m])["twin_accuracy"] for m in models},
        "training_stage_effect": {m: summary(twins["models"][m])["stage_effect"] for m in models},
        "independent": {m: summary(independent["models"][m]) for m in models},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


INDEPENDENT_COLUMNS = [
    (name, lambda r, m, key=key: r["independent"][m][key])
    for name, key in [
        ("twin acc.", "twin_accuracy"),
        ("stage effect", "stage_effect"),
        ("false premise", "false_premise"),
        ("knowledge+identity", "knowledge_identity"),
        ("accuracy", "accuracy"),
    ]
]


def table(results: dict, columns: list | None = None) -> str:
    columns = columns or [
        ("training twins", lambda r, m: r["training_twins"][m]),
        ("twin acc.", lambda r, m: r["held_out"][m]["twin_accuracy"]),
        ("stage effect", lambda r, m: r["held_out"][m]["stage_effect"]),
        ("false premise", lambda r, m: r["held_out"][m]["false_premise"]),
        ("knowledge+identity", lambda r, m: r["held_out"][m]["knowledge_identity"]),
        ("persona attribution", lambda r, m: r["held_out"][m]["persona_attribution"]),
        ("stage attribution", lambda r, m: r["held_out"][m]["stage_attribution"]),
        ("accuracy", lambda r, m: r["held_out"][m]["accuracy"]),
    ]
    lines = [
        "| variant | SFT / DPO steps | SFT + DPO min | " + " | ".join(c for c, _ in columns) + " |",
        "|---|---|---:|" + "---|" * len(columns),
    ]
    for name, r in results.items():
        steps = [str(r.get("steps", {}).get(step, "-")) for step in ("sft", "dpo")]
        if r.get("first_dpo"):
            steps[1] = f"{results.get(r['first_dpo'], {}).get('steps', {}).get('dpo', '?')} + {steps[1]}"
        minutes = sum(r["seconds"].values()) / 60
        mark = " (pipeline)" if r.get("seconds_from_run") else ""
        cells = [
            " / ".join(f"{f(r, m):.2f}" if f(r, m) is not None else "-" for m in ("base", "sft", "dpo"))
            for _, f in columns
        ]
        lines.append(f"| {name} | {' / '.join(steps)} | {minutes:.1f}{mark} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines) + "\n\n(each cell: base / SFT / DPO; (pipeline): the demo run's step times, its "
        "probes during training included)\n"
    )


def tables(results: dict) -> str:
    """The first probe sets' and training twins' table, then the independent sets' (for the
    variants measured since those sets exist)."""
    scored = {name: r for name, r in results.items() if "independent" in r}
    return table(results) + "\nOn the independent probe sets:\n\n" + table(scored, INDEPENDENT_COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.variants:
        print(f"[recipes] {name}", flush=True)
        results[name] = run_variant(args.run.resolve(), args.out.resolve(), name, VARIANTS[name])
        results_path.write_text(json.dumps(results, indent=2))
        (args.out / "results.md").write_text(tables(results))
        print(tables({name: results[name]}), flush=True)


if __name__ == "__main__":
    main()
