"""Do the persona's own reference answers, shown to the annotator as worked examples
(`reference.few_shot`), make its answers more the persona's?

The demo's build (its config, its annotator: SmolLM2-135M-Instruct served by `persllm serve`) is
run once per few-shot count on the same seed paragraphs, each stage's answer only (no pairs); the
annotated dialogues (reference dialogues apart) are then scored by a model that trained on none of
them (the demo's base model by default) with `persllm probe --dialogues`: persona and stage
attribution, i.e. how often an answer is most likely under its own persona's (stage's) prompt.
Also counted: items kept, why the others were dropped, answer length, and how much of an answer
repeats a shown example (the longest run of words it shares with one, as a share of its words).

    python benchmarks/few_shot_annotation.py --run runs/demo --out runs/few_shot --few-shot 0 2

Results: `<out>/results.json` and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from personify_recipes import persllm  # noqa: E402  (a persllm step, its output to a log)


def build(run: Path, out: Path, base_url: str, model: str, few_shot: int, seeds: int) -> tuple[Path, float]:
    data = out / f"few_shot_{few_shot}"
    config = yaml.safe_load((run / "configs" / "build-data.yaml").read_text())
    config.update(out_dir=str(data))
    config["llm"].update(base_url=base_url, model=model)
    (out / f"build_{few_shot}.yaml").write_text(yaml.safe_dump(config))
    seconds = 0.0
    if not (data / "dialogues.jsonl").is_file():
        seconds = persllm(
            "build-data",
            "--config",
            str(out / f"build_{few_shot}.yaml"),
            f"limits.seeds_per_stage={seeds}",
            f"reference.few_shot={few_shot}",
            "pairs.cross_stage=false",  # each answer in its own stage only: what attribution scores
            "pairs.cross_persona.enabled=false",
            log=out / f"build_{few_shot}.log",
        )
    return data, seconds


def annotated(data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (data / "dialogues.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r["kind"] != "general" and "/ref/" not in r["id"]]


def _words(text: str) -> list[str]:
    return text.lower().split()


def longest_shared_run(answer: str, examples: list[str]) -> float:
    """The longest run of consecutive words `answer` shares with any example, over its words."""
    words = _words(answer)
    best = 0
    for example in examples:
        other = _words(example)
        previous = [0] * (len(other) + 1)
        for w in words:
            current = [0] * (len(other) + 1)
            for j, v in enumerate(other):
                if w == v:
                    current[j + 1] = previous[j] + 1
                    best = max(best, current[j + 1])
            previous = current
    return best / max(len(words), 1)


def shown_examples(data: Path, few_shot: int) -> dict[str, list[str]]:
    """Answer text -> the example answers its request showed (from the build's LLM-call cache,
    which also holds the requests of the counts before, copied with it)."""
    shown = {}
    for line in (data / "cache" / "cache.jsonl").read_text().splitlines():
        record = json.loads(line)
        messages = record["request"]["messages"]
        if messages[0]["content"].startswith("You are ") and len(messages) == 4 + 2 * few_shot > 4:
            examples = [m["content"].split("[Response] ", 1)[-1] for m in messages[4:-1:2]]
            shown[record.get("text", "")] = examples
    return shown


def measure(run: Path, out: Path, data: Path, scorer: Path, few_shot: int, seconds: float) -> dict:
    rows = annotated(data)
    scored = out / f"annotated_{few_shot}.jsonl"
    # every annotated dialogue is scored, whatever its split
    scored.write_text("".join(json.dumps({**r, "split": "test"}) + "\n" for r in rows))
    probes = out / f"probe_{few_shot}.json"
    if not probes.is_file():
        persllm(
            "probe",
            f"scorer={scorer}",
            "--personas-dir",
            yaml.safe_load((run / "configs" / "build-data.yaml").read_text())["personas_dir"],
            "--dialogues",
            str(scored),
            "--json",
            str(probes),
            log=out / f"probe_{few_shot}.log",
        )
    attribution = json.loads(probes.read_text())["models"]["scorer"]["attribution"]
    annotations = [json.loads(line) for line in (data / "annotations.jsonl").read_text().splitlines() if line]
    drops = Counter(a["dropped"] for a in annotations if a.get("dropped"))
    shown = shown_examples(data, few_shot)
    raws = {
        a["answers"][a["stage"]].get("response"): a["answers"][a["stage"]].get("raw")
        for a in annotations
        if a["stage"] in a.get("answers", {})
    }
    answers = [r["messages"][2]["content"] for r in rows]
    copied = [longest_shared_run(a, shown.get(raws.get(a), [])) for a in answers]
    return {
        "few_shot": few_shot,
        "build_seconds": seconds,
        "seeds": len(annotations),
        "kept": len(rows),
        "drops": dict(drops),
        "persona_attribution": attribution["persona"],
        "stage_attribution": attribution["stage"],
        "mean_answer_words": round(sum(len(a.split()) for a in answers) / max(len(answers), 1), 1),
        "longest_shared_run_mean": round(sum(copied) / max(len(copied), 1), 3),
        "longest_shared_run_max": round(max(copied, default=0.0), 3),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| few-shot examples | seeds | kept | drops | persona attribution | stage attribution | answer words | "
        "longest run shared with an example (mean / max) | build min |",
        "|---:|---:|---:|---|---|---|---:|---|---:|",
    ]
    for r in results:
        p, s = r["persona_attribution"], r["stage_attribution"]
        lines.append(
            f"| {r['few_shot']} | {r['seeds']} | {r['kept']} | "
            + (", ".join(f"{k}: {v}" for k, v in r["drops"].items()) or "-")
            + f" | {p['top1']['value']:.2f} [{p['top1']['ci'][0]:.2f}, {p['top1']['ci'][1]:.2f}] (chance {p['chance']:.2f})"
            + f" | {s['top1']['value']:.2f} [{s['top1']['ci'][0]:.2f}, {s['top1']['ci'][1]:.2f}] (chance {s['chance']:.2f})"
            + f" | {r['mean_answer_words']} | {r['longest_shared_run_mean']:.2f} / {r['longest_shared_run_max']:.2f}"
            + f" | {r['build_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--few-shot", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seeds-per-stage", type=int, default=8)
    parser.add_argument(
        "--scorer", type=Path, default=None, help="the scoring model (default: the run's base model)"
    )
    parser.add_argument(
        "--annotator", type=Path, default=None, help="default: the run's annotator (its HF copy)"
    )
    args = parser.parse_args()
    run, out = args.run.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    annotator = args.annotator or next((run / "hf_from_gguf").iterdir())
    from persllm_jax.inference.serving import ServerProcess

    results = []
    with ServerProcess(
        str(annotator), model_name="smollm2", max_batch=16, log_path=out / "server.log"
    ) as server:
        cache = None
        for few_shot in args.few_shot:
            target = out / f"few_shot_{few_shot}" / "cache"
            if cache is not None and not target.exists():
                shutil.copytree(cache, target)  # the seeds' questions asked once for every count
            data, seconds = build(
                run, out, server.base_url, server.model_name, few_shot, args.seeds_per_stage
            )
            cache = data / "cache"
            results.append(
                measure(run, out, data, (args.scorer or run / "base_model").resolve(), few_shot, seconds)
            )
            print(table(results[-1:]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
