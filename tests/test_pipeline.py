"""`persllm pipeline` end to end on configs/demo_smoke.yaml: the real SmolLM2 annotator served by
`persllm serve` on loopback, build-data, SFT, DPO, eval with the served model as judge, export,
talk, and transformers answering from the export. A rerun skips every finished step."""

import json
import os
import re
import signal
import subprocess
import sys
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


# The smoke SFT made 4 steps long, a checkpoint after each: the test kills it after the first.
SFT_LONGER = (
    "sft.overrides=[train.max_steps=4, train.batch_size=2, train.seq_len=256, model.remat=full, "
    "train.logits_chunk=128, checkpoint.every_steps=1]"
)

# Given as overrides, as a user would pass real keys; the local servers ignore them.
SECRET = "sk-persllm-test-7f3c9a1e55d2"


def _with_keys() -> list[str]:
    """The smoke config's build and eval overrides plus an API key for the annotator and judge."""
    smoke = yaml.safe_load((ROOT / "configs" / "demo_smoke.yaml").read_text())
    build = smoke["build"]["overrides"] + [f"llm.api_key={SECRET}"]
    judge = smoke["eval"]["overrides"] + [f"judge.api_key={SECRET}"]
    return [f"build.overrides={json.dumps(build)}", f"eval.overrides={json.dumps(judge)}"]


def _child_running(parent: int, *words: str) -> int | None:
    """The pid of a child process of `parent` whose command line holds every one of `words`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and all(w in cmdline for w in words):
            return int(proc.name)
    return None


def _kill_sft_after_its_first_checkpoint(pipeline: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 1800
    while not (out / "sft" / "checkpoints" / "1").is_dir():
        assert pipeline.poll() is None, pipeline.communicate()
        assert time.time() < deadline, "sft saved no checkpoint"
        time.sleep(0.1)
    pid = _child_running(pipeline.pid, "persllm_jax.cli", "sft")
    assert pid is not None, "the sft step's process is not running"
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_demo_smoke_pipeline(tmp_path):
    """The smoke pipeline as a user meets it: its SFT step SIGKILLed (as the out-of-memory killer
    does) after its first checkpoint; the pipeline says which signal, the likely cause, the step's
    peak memory and the command that resumes it; that command, run as printed (with the API key
    given again), finishes the whole run, and the resumed trainer says what became of the killed
    one."""
    out = tmp_path / "demo"
    args = [
        "--config",
        str(ROOT / "configs" / "demo_smoke.yaml"),
        f"out_dir={out}",
        *_with_keys(),
        SFT_LONGER,
    ]
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "persllm_jax.cli", "pipeline", *args],
        cwd=ROOT,
        env={**os.environ, **ONE_DEVICE},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _kill_sft_after_its_first_checkpoint(pipeline, out)
    first_out, first_err = pipeline.communicate(timeout=600)
    assert pipeline.returncode == 2, (first_out, first_err)
    message = next(line for line in first_err.splitlines() if "was killed" in line)
    assert message.startswith(
        "persllm pipeline: error: step sft was killed by SIGKILL: most likely the kernel's out-of-memory killer"
    )
    assert re.search(r"Its peak memory was \d+\.\d\d GB of the machine's \d+\.\d GB", message), message
    assert "finished steps are skipped and sft resumes from its checkpoint of step" in message
    assert (out / "logs" / "sft.log").read_text().rstrip().endswith(message.split("error: ", 1)[1])
    assert SECRET not in first_out + first_err
    command = message.rsplit("): ", 1)[1].strip()
    assert command.startswith("persllm pipeline --config ") and "llm.api_key=KEY" in command
    result = subprocess.run(
        ["bash", "-c", command.replace("=KEY", f"={SECRET}")],
        cwd=ROOT,
        env={**os.environ, **ONE_DEVICE, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[pipeline] build-data: done earlier, skipped" in result.stdout
    sft_log = (out / "logs" / "sft.log").read_text()
    assert "the previous training process here" in sft_log and "out-of-memory killer" in sft_log
    assert "resumed from step" in sft_log
    steps = [json.loads(line)["step"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == 4, steps  # each step logged once
    assert re.search(
        r"\[pipeline\] finished in [\d.]+ min \(this run\); [\d.]+ min over all 2 runs", result.stdout
    )
    result.stdout = first_out + result.stdout
    # the logs a person reads: no HTTP request lines, no progress-bar debris, no TFDS download talk
    logs = {path.name: path.read_text(errors="replace") for path in (out / "logs").glob("*.log")}
    assert {"base.log", "build-data.log", "sft.log", "dpo.log", "eval.log"} <= set(logs)
    for name, text in logs.items():
        assert "\r" not in text and "HTTP Request:" not in text and "Downloading and preparing" not in text, (
            name
        )
        assert "it/s]" not in text and "s/it]" not in text, name
    assert re.search(r"answers \(attempt 1\): 0/\d+ \(0%\), started", logs["build-data.log"])
    done = r"sft steps: 4/4 \(100%\), [\d.]+ step/s, \d\d:\d\d elapsed, loss [\d.]+, tok_s \d+, peak_memory [\d.]+ GB"
    assert re.search(done, logs["sft.log"])
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
