"""report.json / report.md / PNGs from a small fixed input."""

import json

import numpy as np
import pytest
from PIL import Image

from persllm_jax.evaluation.report import REPORT_JSON, REPORT_MD, collect_metrics, fmt, write_report


def distinction(intra, stage, inter):
    personas = {
        "holmes": {"intra": intra, "stage": stage, "inter": inter, "n_items": 3},
        "darwin": {"intra": intra + 1.0, "stage": None, "inter": inter + 0.5, "n_items": 2},
    }
    average = {"intra": intra + 0.5, "stage": stage, "inter": inter + 0.25, "n_personas": 2, "n_items": 5}
    return {"personas": personas, "average": average}


def judge_model(knowledge, attitude, rate, rank):
    def scores(mean):
        return {"mean": mean, "asked": 4, "parsed": 3, "unparsed": 1, "failed": 0, "histogram": {"3": 3}}

    summary = {
        "knowledge": scores(knowledge),
        "attitude": scores(attitude),
        "anti_induction": {
            "rate": rate,
            "yes": 1,
            "no": 1,
            "asked": 2,
            "parsed": 2,
            "unparsed": 0,
            "failed": 0,
        },
        "ranking": {"mean_rank": rank, "n_ranked": 5},
    }
    return {**summary, "not_scored": {"neither": 1, "unlabelled": 0}, "by_persona": {"holmes": summary}}


@pytest.fixture
def metrics():
    judge = {
        "models": {
            "base": judge_model(1.25, 2.5, 0.125, 2.75),
            "sft": judge_model(2.75, 3.125, 0.5, 1.75),
            "dpo": judge_model(3.5, None, 0.875, 1.5),
        },
        "classification": {"asked": 5, "parsed": 4, "unparsed": 1, "failed": 0, "counts": {"knowledge": 3}},
        "ranking": {"asked": 5, "parsed": 5, "unparsed": 0, "failed": 0, "skipped_items": 0},
        "parse_counts": [
            {"step": "classify", "model": None, "asked": 5, "parsed": 4, "unparsed": 1, "failed": 0},
            {
                "step": "score_knowledge",
                "model": "dpo",
                "asked": 17,
                "parsed": 13,
                "unparsed": 3,
                "failed": 1,
            },
        ],
        "client": {"requests_sent": 31, "cache_hits": 2, "failures": 1},
    }
    return collect_metrics(
        ["base", "sft", "dpo"],
        distinction={
            "base": distinction(2.5, 3.25, 0.75),
            "sft": distinction(3.53, 3.46, 0.38),
            "dpo": distinction(3.86, 3.5, 0.33),
        },
        judge=judge,
        dpo={
            "sft": {
                "reward_accuracy": 0.5,
                "reward_margin": 0.0,
                "chosen_reward": 0.0,
                "rejected_reward": 0.0,
                "n_pairs": 8,
                "reference": "sft",  # measured against itself: its rewards are zero by definition
            },
            "dpo": {
                "reward_accuracy": 0.8125,
                "reward_margin": 1.234,
                "chosen_reward": 0.9,
                "rejected_reward": -0.334,
                "n_pairs": 8,
                "reference": "sft",
            },
        },
        perplexity={
            "base": {"perplexity": 21.5, "nll": 3.0681, "n_tokens": 400},
            "dpo": {"perplexity": np.float32(14.25), "nll": 2.657, "n_tokens": 400},
        },
        meta={"data": "dialogues.jsonl"},
    )


def write_run(run_dir, steps, dpo=False):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "loss": 2.0 / step}
            if dpo:
                row["rewards/accuracies"] = min(1.0, step / steps)
            f.write(json.dumps(row) + "\n")
    return run_dir


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 50


def test_write_report(tmp_path, metrics):
    runs = {
        "sft": write_run(tmp_path / "runs" / "sft", 6),
        "dpo": write_run(tmp_path / "runs" / "dpo", 4, dpo=True),
    }
    runs["missing"] = tmp_path / "runs" / "nothing-here"
    written = write_report(tmp_path / "report", metrics, run_dirs=runs, title="Demo evaluation")

    out = tmp_path / "report"
    for key in ("json", "md", "table", "distinction", "loss:sft", "loss:dpo"):
        assert written[key].is_file(), key
    assert "loss:missing" not in written  # a run without metrics.jsonl draws no curve
    for key in ("table", "distinction", "loss:sft", "loss:dpo"):
        assert_png(written[key])

    report = json.loads((out / REPORT_JSON).read_text())
    expected = json.loads(json.dumps({k: v for k, v in metrics.items()}, default=float))
    assert {k: report[k] for k in expected} == expected
    assert report["models"]["dpo"]["perplexity"]["perplexity"] == 14.25  # a numpy scalar became a number
    assert report["report"]["files"]["md"] == REPORT_MD

    md = (out / REPORT_MD).read_text()
    lines = md.splitlines()
    assert lines[0] == "# Demo evaluation"
    header = next(line for line in lines if line.startswith("| Model | Intra BLEU"))
    for column in (
        "Stage BLEU",
        "Inter BLEU",
        "Reward acc.",
        "Reward margin",
        "Perplexity",
        "Anti-induction",
    ):
        assert column in header
    for column in ("Knowledge (0-5)", "Attitude (0-5)", "Mean rank"):
        assert column in header
    # judge figures carry the number of parsed judgments they rest on; the reference's rewards say so
    dpo_row = (
        "| dpo | 4.36 | 3.50 | 0.58 | 0.812 | 1.234 | 14.25 | 0.875 (n=2) | 3.50 (n=3) | - | 1.50 (n=5) |"
    )
    assert dpo_row in lines
    base_row = (
        "| base | 3.00 | 3.25 | 1.00 | - | - | 21.50 | 0.125 (n=2) | 1.25 (n=3) | 2.50 (n=3) | 2.75 (n=5) |"
    )
    assert base_row in lines
    sft_row = "| sft | 4.03 | 3.46 | 0.63 | reference | reference | - | 0.500 (n=2) | 2.75 (n=3) | 3.12 (n=3) | 1.75 (n=5) |"
    assert sft_row in lines
    assert "| dpo | 8 | 0.900 | -0.334 | 2.6570 | 400 | 5 |" in lines  # details: pairs, rewards, NLL
    assert "| sft | 8 | reference | reference | - | - | 5 |" in lines
    assert md.index("## Model comparison") < md.index("## Per persona") < md.index("## Judge parse counts")
    assert (
        "| holmes | 3 | 3.86 | 3.50 | 0.33 | 0.875 (n=2) | 3.50 (n=3) | - | 1.50 (n=5) |" in md
    )  # dpo's holmes
    assert "| darwin | 2 | 4.86 | - | 0.83 | - | - | - | - |" in md  # no judge slice for darwin
    assert "| score_knowledge | dpo | 17 | 13 | 3 | 1 |" in md
    assert "| classify | all | 5 | 4 | 1 | 0 |" in md
    assert "Judge requests sent: 31" in md
    for name in ("comparison_table.png", "distinction_bleu.png", "loss_sft.png", "loss_dpo.png"):
        assert f"]({name})" in md


def test_empty_and_partial_inputs(tmp_path):
    written = write_report(tmp_path / "empty", collect_metrics([]))
    assert set(written) == {"md", "json"}
    only_ppl = collect_metrics(
        ["base"], perplexity={"base": {"perplexity": float("nan"), "nll": 1.0, "n_tokens": 3}}
    )
    written = write_report(tmp_path / "ppl", only_ppl)
    md = written["md"].read_text()
    assert "| base | - | - | - | - | - | - | - | - | - | - |" in md  # NaN shows as missing
    report = json.loads(written["json"].read_text())
    assert report["models"]["base"]["perplexity"]["perplexity"] is None
    assert_png(written["table"])


def test_fmt():
    assert fmt(None) == "-" and fmt(float("inf")) == "-" and fmt(True) == "-" and fmt("x") == "-"
    assert fmt(3.14159) == "3.14" and fmt(7, "d") == "7" and fmt(0.5, ".3f") == "0.500"


def test_probe_curves_of_the_training_runs(tmp_path):
    """Runs that evaluated persona probes during training get one figure of their curves."""
    runs = {"sft": write_run(tmp_path / "runs" / "sft", 4), "dpo": write_run(tmp_path / "runs" / "dpo", 4)}
    with open(runs["sft"] / "metrics.jsonl", "a") as f:
        for step, accuracy in ((0, 0.4), (2, 0.5), (4, 0.6)):
            record = {"eval/probes/accuracy": accuracy, "eval/probes/twin_accuracy": accuracy / 4}
            f.write(json.dumps({"step": step, **record, "eval/probes/stage_effect": 0.1}) + "\n")
    written = write_report(tmp_path / "report", collect_metrics(["sft", "dpo"]), run_dirs=runs)
    assert_png(written["probes_curve"])
    assert "](probes_during_training.png)" in written["md"].read_text()
    plain = write_report(tmp_path / "plain", collect_metrics(["dpo"]), run_dirs={"dpo": runs["dpo"]})
    assert "probes_curve" not in plain and not (tmp_path / "plain" / "probes_during_training.png").exists()
