"""The README's commands, run as a new user runs them: in a clean checkout of this tree (its tracked
files as they are now, no runs, no caches; the test set-up's .venv), in the order the README gives
them. Every bash and Python block of the README is marked, on the line before it, as tested (run
here) or illustrative (a TPU pod, a SLURM cluster, an 8B compile, CI's own command; each names what
runs it at test scale).

The demo block runs `bash scripts/demo.sh` at the smoke test's scale (configs/demo_smoke.yaml, with
API keys given as a user gives them) into `runs/demo`, where the later blocks find its models. On
its way its SFT step is SIGKILLed, as the out-of-memory killer does, after its first checkpoint:
the pipeline must say which signal, the likely cause, the step's peak memory and the command that
resumes it, and that command, run as printed, must finish the run."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from tests.cli_helpers import user_environment
from tests.probe_questions import assert_no_probe_question_in

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Commands run as a user would on this machine: one CPU device, not the tests' 8 fake ones.
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
MARK = re.compile(r"^<!-- (tested|illustrative): (.+) -->$")

# Given as overrides, as a user would pass real keys; the local servers ignore them.
SECRET = "sk-persllm-test-7f3c9a1e55d2"
# The smoke SFT made 4 steps long, a checkpoint after each: the test kills it after the first.
SFT_LONGER = (
    "sft.overrides=[train.max_steps=4, train.batch_size=2, train.seq_len=256, model.remat=full, "
    "train.logits_chunk=128, checkpoint.every_steps=1]"
)


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # of the opening fence in README.md
    language: str
    mark: str  # tested | illustrative | "" (unmarked)
    code: str


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(bash|python)$", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            mark = MARK.match(lines[i - 1]) if i else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(i + 1, fence.group(1), mark.group(1) if mark else "", code))
            i = end
        i += 1
    return blocks


def test_every_command_block_is_tested_or_marked_illustrative():
    blocks = readme_blocks()
    unmarked = [b.line for b in blocks if not b.mark]
    assert not unmarked, f"README.md blocks at lines {unmarked} are neither tested nor illustrative"
    tested = [b for b in blocks if b.mark == "tested"]
    assert len(tested) >= 4 and "bash scripts/demo.sh" in tested[0].code


def _with_keys() -> list[str]:
    """The smoke config's build and eval overrides plus an API key for the annotator and judge."""
    smoke = yaml.safe_load((ROOT / "configs" / "demo_smoke.yaml").read_text())
    build = smoke["build"]["overrides"] + [f"llm.api_key={SECRET}"]
    judge = smoke["eval"]["overrides"] + [f"judge.api_key={SECRET}"]
    return [f"build.overrides={json.dumps(build)}", f"eval.overrides={json.dumps(judge)}"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Iterator[Path]:
    """This tree's tracked files, as they are now, in a directory of their own, with .venv."""
    out = tmp_path_factory.mktemp("clean") / "persllm-jax"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, out / name)
    (out / ".venv").symlink_to(ROOT / ".venv")
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)  # the demo's runs: several GB of checkpoints


def _environment(checkout: Path) -> dict:
    venv_bin = checkout / ".venv" / "bin"
    # the copy's code, not the tree the .venv was installed from
    return {
        **user_environment(),
        **ONE_DEVICE,
        "PYTHONPATH": str(checkout),
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
    }


def _bash(checkout: Path, code: str, timeout: int = 1200, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", code],
        cwd=checkout,
        env=_environment(checkout),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def _run_block(checkout: Path, block: Block) -> subprocess.CompletedProcess:
    if block.language == "python":
        command = [str(checkout / ".venv" / "bin" / "python"), "-c", block.code]
        result = subprocess.run(
            command, cwd=checkout, env=_environment(checkout), capture_output=True, text=True, timeout=900
        )
    else:
        result = _bash(checkout, block.code)
    assert result.returncode == 0, (
        f"README.md block at line {block.line} failed:\n{block.code}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _processes_running(*words: str) -> list[int]:
    """The pids of processes whose command line holds every one of `words`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(w in cmdline for w in words):
            found.append(int(proc.name))
    return found


def _kill_sft_after_its_first_checkpoint(out: Path, pipeline: subprocess.Popen) -> None:
    deadline = time.time() + 1800
    while not (out / "sft" / "checkpoints" / "1").is_dir():
        assert pipeline.poll() is None, (
            f"the pipeline ended (exit {pipeline.returncode}) before sft's checkpoint"
        )
        assert time.time() < deadline, "sft saved no checkpoint"
        time.sleep(0.1)
    pids = _processes_running("persllm_jax.cli", "sft", str(out / "configs" / "sft.yaml"))
    assert len(pids) == 1, f"the sft step's process: {pids}"
    os.kill(pids[0], signal.SIGKILL)


@pytest.mark.slow
def test_the_readme_commands_run_in_order(checkout):
    """Each tested block in turn; the demo first (see the module's docstring), the others as
    written, each checked for what the README says it prints or makes."""
    blocks = [b for b in readme_blocks() if b.mark == "tested"]
    _the_demo(checkout, blocks[0])
    outputs = [_run_block(checkout, block) for block in blocks[1:]]
    printed = "\n".join(r.stdout + r.stderr for r in outputs)
    for expected in (
        "sft finished: runs/sft_tiny",
        "dpo finished: runs/dpo_tiny",
        "runs/smollm2_stages (134.5M parameters, vocabulary 49155)",
    ):
        assert expected in printed, expected
    assert (checkout / "runs" / "smollm2_stages_saved" / "config.json").is_file()
    # the illustrative blocks that use the demo's outputs name only paths the demo made
    named = set()
    for block in readme_blocks():
        if block.mark == "illustrative":
            named |= set(re.findall(r"runs/demo/[\w./-]+", block.code))
    talk = yaml.safe_load((checkout / "configs" / "talk_demo.yaml").read_text())
    named |= {agent["model"] for agent in talk["agents"]} | {talk["personas_dir"]}
    assert {"runs/demo/dpo", "runs/demo/hf_model", "runs/demo/sft"} <= named
    missing = sorted(path for path in named if not (checkout / path).exists())
    assert not missing, f"README examples name paths the demo did not make: {missing}"


def _the_demo(checkout: Path, block: Block) -> None:
    line = block.code.splitlines()[0].split("#")[0].strip()
    assert line == "bash scripts/demo.sh"
    out = checkout / "runs" / "demo"
    args = ["--config", "configs/demo_smoke.yaml", "out_dir=runs/demo", *_with_keys(), SFT_LONGER]
    # into files, not pipes: nothing reads a pipe while the test waits, and a full one would block
    with open(checkout / "demo.out", "w") as stdout, open(checkout / "demo.err", "w") as stderr:
        pipeline = subprocess.Popen(
            ["bash", "scripts/demo.sh", *args],
            cwd=checkout,
            env=_environment(checkout),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            _kill_sft_after_its_first_checkpoint(out, pipeline)
            pipeline.wait(timeout=600)
        finally:
            pipeline.kill()
    first_out, first_err = (checkout / "demo.out").read_text(), (checkout / "demo.err").read_text()
    assert "setup: .venv is current" in first_out  # the set-up step of demo.sh found it done
    assert pipeline.returncode == 2, (first_out, first_err)
    message = next(line for line in first_err.splitlines() if "was killed" in line)
    assert message.startswith(
        "persllm pipeline: error: step sft was killed by SIGKILL: most likely the kernel's out-of-memory killer"
    )
    assert re.search(r"Its peak memory was \d+\.\d\d GiB of the machine's \d+\.\d GiB", message), message
    assert "finished steps are skipped and sft resumes from its checkpoint of step" in message
    assert (out / "logs" / "sft.log").read_text().rstrip().endswith(message.split("error: ", 1)[1])
    assert SECRET not in first_out + first_err
    command = message.rsplit("): ", 1)[1].strip()
    assert command.startswith("persllm pipeline --config ") and "llm.api_key=KEY" in command
    result = _bash(checkout, command.replace("=KEY", f"={SECRET}"), timeout=2400)
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
    # the logs a person reads: no HTTP request lines, no progress-bar debris, no TFDS download talk,
    # no failed TPU start-up
    logs = {path.name: path.read_text(errors="replace") for path in (out / "logs").glob("*.log")}
    assert {"base.log", "build-data.log", "sft.log", "dpo.log", "eval.log"} <= set(logs)
    for name, text in logs.items():
        assert "\r" not in text and "HTTP Request:" not in text and "Downloading and preparing" not in text, (
            name
        )
        assert "it/s]" not in text and "s/it]" not in text, name
        assert "TPU accelerator type" not in text and "InitGoogle" not in text, name  # libtpu's start-up
    assert re.search(r"annotated seeds: 0/\d+ \(0%\), started", logs["build-data.log"])
    # the GGUF is dequantised once, in the base step; both annotator servers load its HF copy
    [converted] = (out / "hf_from_gguf").iterdir()
    assert converted.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert result.stdout.count("[pipeline] base: persllm export-hf ") == 1
    assert logs["annotator_server.log"].count(f"loaded {converted} as 'smollm2'") == 2
    done = r"sft steps: 4/4 \(100%\), [\d.]+ step/s, \d\d:\d\d elapsed, done, loss [\d.]+, tok_s \d+, peak_memory [\d.]+ GiB"
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
    assert "report:      runs/demo/eval/report.md" in result.stdout  # relative to where it ran
    assert "## Persona probes" in (out / "eval" / "report.md").read_text()
    for model in ("base", "sft", "dpo"):
        assert re.search(
            rf"  probes:      {model}: accuracy 0\.\d{{3}} \(n=63\), twin accuracy", result.stdout
        )
    built = [
        json.loads(line)
        for name in ("dialogues", "pairs")
        for line in (out / "data" / f"{name}.jsonl").open()
    ]
    assert_no_probe_question_in(built)

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
    again = _bash(checkout, command.replace("=KEY", f"={SECRET}"))
    assert again.returncode == 0 and again.stdout.count("done earlier, skipped") == 8
    assert time.time() - started < 120
