"""`persllm pipeline` end to end on configs/demo_smoke.yaml: the real SmolLM2 annotator served by
`persllm serve` on loopback, build-data, SFT, DPO, eval with the served model as judge, export,
talk, and transformers answering from the export. A rerun skips every finished step."""

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
# The pipeline runs as a user would on this machine: one CPU device, not the tests' 8 fake ones
# (the smoke config's batches of 2 do not split over 8 devices).
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


# Given as overrides, as a user would pass real keys; the local servers ignore them.
SECRET = "sk-persllm-test-7f3c9a1e55d2"


def _with_keys() -> list[str]:
    """The smoke config's build and eval overrides plus an API key for the annotator and judge."""
    smoke = yaml.safe_load((ROOT / "configs" / "demo_smoke.yaml").read_text())
    build = smoke["build"]["overrides"] + [f"llm.api_key={SECRET}"]
    judge = smoke["eval"]["overrides"] + [f"judge.api_key={SECRET}"]
    return [f"build.overrides={json.dumps(build)}", f"eval.overrides={json.dumps(judge)}"]


@pytest.mark.slow
def test_demo_smoke_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(
        "pipeline",
        "--config",
        ROOT / "configs" / "demo_smoke.yaml",
        f"out_dir={out}",
        *_with_keys(),
        cwd=ROOT,
        timeout=2400,
        env=ONE_DEVICE,
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 50
    assert not [p for p in files if SECRET.encode() in p.read_bytes()], "an API key reached a file"
    assert SECRET not in result.stdout + result.stderr
    assert "api_key: env:PERSLLM_BUILD_DATA_LLM_API_KEY" in (out / "configs" / "build-data.yaml").read_text()
    for step in ("base", "build-data", "sft", "dpo", "eval", "export", "talk", "reload"):
        assert (out / "steps" / f"{step}.json").exists(), step
        # every step's peak resident memory is recorded, real (over 100 MB: the step loaded a
        # model) and within a laptop's 8 GB
        peak = json.loads((out / "steps" / f"{step}.json").read_text())["peak_rss_mb"]
        assert 100 < peak < 8 * 1024, (step, peak)
        assert f"[pipeline] {step}: finished in" in result.stdout
    assert f"report:      {out / 'eval' / 'report.md'}" in result.stdout

    report = json.loads((out / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["base", "sft", "dpo"]
    for name, metrics in report["models"].items():
        assert metrics["perplexity"]["perplexity"] > 1, name
        assert metrics["distinction"]["average"]["n_items"] >= 1, name
    assert report["models"]["dpo"]["dpo"]["reference"] == "sft"
    judge = report["judge"]["parse_counts"]
    assert judge and all(row["asked"] >= row["parsed"] for row in judge)  # the real judge was asked
    for png in ("comparison_table.png", "distinction_bleu.png", "loss_sft.png", "loss_dpo.png"):
        assert (out / "eval" / png).stat().st_size > 1000, png

    # The export loads in transformers, with the stage tokens as single special tokens.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "hf_model")
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf_model", dtype=torch.float32)
    assert len(tokenizer.encode("<TIME-II>", add_special_tokens=False)) == 1
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    answers = [json.loads(line) for line in (out / "hf_answers" / "answers.jsonl").read_text().splitlines()]
    assert {(a["persona"], a["stage"]) for a in answers} == {
        (p, s) for p in ("holmes", "elizabeth", "darwin") for s in ("early", "late")
    }
    transcript = [json.loads(line) for line in (out / "talk" / "transcript.jsonl").read_text().splitlines()]
    assert [t["persona"] for t in transcript] == ["holmes", "darwin"]

    started = time.time()
    again = run_cli(
        "pipeline",
        "--config",
        ROOT / "configs" / "demo_smoke.yaml",
        f"out_dir={out}",
        *_with_keys(),
        cwd=ROOT,
        env=ONE_DEVICE,
    )
    assert again.stdout.count("done earlier, skipped") == 8
    assert time.time() - started < 120
