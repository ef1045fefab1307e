"""`persllm compile`: the sft / dpo train step compiled ahead of time for a TPU slice (libtpu on this
CPU) or fake CPU devices, with the bytes each device holds, checked against sizes computed here."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "devices",
    "device_kind",
    "device_memory_bytes",
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "temp_bytes",
    "code_bytes",
    "total_bytes",
    "fits",
    "model_flops_per_step",
}
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed"
)


def _compile(task, topology, tmp_path, *overrides, check=True):
    out = tmp_path / f"{task}.json"
    config = ROOT / "configs" / f"{task}_tiny.yaml"
    result = run_cli(
        "compile",
        task,
        "--topology",
        topology,
        "--config",
        config,
        "--json",
        out,
        *overrides,
        cwd=ROOT,
        check=check,
        timeout=600,
    )
    return result, (json.loads(out.read_text()) if out.is_file() else None)


def _tiny_state_bytes_per_device(fsdp: int) -> int:
    """Parameters + two AdamW moments of the tiny preset grown by 3 stage tokens, fp32, every
    sharded dimension divided by fsdp (written out from the preset's shapes, not from the code)."""
    vocab, d, f, layers, q, kv = 49152 + 3, 64, 128, 2, 4 * 16, 2 * 16
    sharded = vocab * d + layers * (d * (q + 2 * kv) + q * d + 3 * d * f)  # embed (tied) and kernels
    replicated = d + layers * 2 * d  # final norm; two norms per layer
    if (vocab * d) % fsdp or d % fsdp:
        raise AssertionError("the independent count assumes fsdp divides the hidden size")
    return 3 * 4 * (sharded // fsdp + replicated)


def test_sft_on_fake_cpu_devices_holds_its_shards(tmp_path):
    result, report = _compile("sft", "cpu:8", tmp_path)
    assert set(report) == KEYS and report["devices"] == 8 and report["fits"] is True
    # per token: ids, targets, 2 masks; persona, stage, length, segment ids, positions (int32)
    batch_bytes = (8 // 8) * 128 * (4 + 4 + 1 + 1 + 5 * 4)
    counters = 3 * 4  # the step and two optimizer counts
    assert report["argument_bytes"] == _tiny_state_bytes_per_device(8) + batch_bytes + counters
    assert report["alias_bytes"] == _tiny_state_bytes_per_device(8) + counters  # the state is donated
    assert report["total_bytes"] == (
        report["argument_bytes"]
        + report["output_bytes"]
        - report["alias_bytes"]
        + report["temp_bytes"]
        + report["code_bytes"]
    )
    assert "verdict: fits" in result.stdout


@needs_libtpu
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_tiny_steps_compile_for_a_v5e_slice(task, tmp_path):
    result, report = _compile(task, "v5e:2x2", tmp_path)
    assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["device_memory_bytes"] == 16 * 1024**3 and report["fits"] is True
    # TPU pads small arrays to its tiles, so compare with the unpadded shard sizes loosely
    state = _tiny_state_bytes_per_device(4)
    assert state <= report["argument_bytes"] <= 1.25 * state + 2**20, report
    # 6 N per token, the output projection and causal attention included
    tokens = 8 * 128 * (2 if task == "dpo" else 1)
    matmuls = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 64 * (49152 + 3)
    attention = 2 * 2 * 128 * 64
    assert report["model_flops_per_step"] == pytest.approx(3 * (2 * matmuls + attention) * tokens, rel=1e-9)
    assert "projected step time at 50% MFU" in result.stdout


@pytest.mark.slow
@needs_libtpu
def test_splash_attention_compiles_into_the_step(tmp_path):
    common = ("mesh.fsdp=2", "mesh.tensor=2", "train.seq_len=2048", "model.remat=full")
    _, xla = _compile("sft", "v5e:2x2", tmp_path, *common)
    _, splash = _compile("sft", "v5e:2x2", tmp_path, *common, "model.attention_impl=splash")
    assert splash["fits"] is True and splash["argument_bytes"] == xla["argument_bytes"]
    # A layer's fp32 scores, [4 rows, 2 heads, 2048, 2048] per chip, are 128 MiB; the splash kernel and
    # XLA's block-wise attention both work block by block, so neither step's temporaries hold them
    scores = 4 * 2 * 2048 * 2048 * 4
    assert splash["temp_bytes"] < scores and xla["temp_bytes"] < scores, (splash, xla)


@pytest.mark.parametrize("attention", ["xla", "splash"])
@needs_libtpu
def test_a_gemma3_step_with_local_and_global_layers_compiles_for_tpu(attention, tmp_path):
    """The tiny Gemma 3 (a sliding-window layer, then a global one) on rows longer than its window:
    one layer scan, the window and rotary tables per layer, and with splash the real kernel's local
    and causal masks, both compiled by libtpu."""
    common = (
        "model.preset=tiny_gemma3",
        "mesh.fsdp=4",
        "train.seq_len=256",
        f"model.attention_impl={attention}",
    )
    _, report = _compile("sft", "v5e:2x2", tmp_path, *common)
    assert report["fits"] is True and report["devices"] == 4


@needs_libtpu
def test_a_frozen_dpo_reference_is_sharded_like_the_parameters(tmp_path):
    _, cached = _compile("dpo", "v5e:2x2", tmp_path)
    _, frozen = _compile("dpo", "v5e:2x2", tmp_path, "dpo.reference=frozen")
    params = _tiny_state_bytes_per_device(4) // 3
    extra = frozen["argument_bytes"] - cached["argument_bytes"] + 8 * 4 * 2 // 4  # less the cached log-probs
    assert params <= extra <= 1.25 * params + 2**20, (extra, params)


def test_a_step_that_does_not_fit_exits_1(tmp_path):
    result, report = _compile(
        "sft", "cpu:2", tmp_path, "mesh.fsdp=2", "train.batch_size=2", "train.seq_len=128", check=False
    )
    assert result.returncode == 0 and report["fits"] is True
    huge = math.ceil(report["device_memory_bytes"] / (2 * 128 * 49155 * 4)) * 2  # fp32 logits alone overflow
    result, report = _compile(
        "sft",
        "cpu:2",
        tmp_path,
        "mesh.fsdp=2",
        f"train.batch_size={huge}",
        "train.seq_len=128",
        "train.logits_chunk=128",
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert report["fits"] is False and report["total_bytes"] > report["device_memory_bytes"]
    assert "does NOT fit" in result.stdout


@needs_libtpu
def test_a_step_the_tpu_compiler_refuses_is_reported_as_not_fitting(tmp_path):
    """libtpu will not build a step whose temporaries exceed the chip: that is a 'does not fit'
    with the compiler's own figure, not a crash."""
    _, fits = _compile("sft", "v5e:2x2", tmp_path)
    result, report = _compile(
        "sft", "v5e:2x2", tmp_path, "train.batch_size=4096", "train.seq_len=4096", check=False
    )
    assert result.returncode == 1, result.stderr
    assert report["fits"] is False and "the compiler refused the step: RESOURCE_EXHAUSTED" in result.stdout
    # 1024 rows of 4096 per chip: the compiler's own figure for the temporaries is past the chip's 16 GiB
    assert report["temp_bytes"] > report["device_memory_bytes"]
    # the state's shards as computed from the shardings, like the compiler's count where it fits
    assert report["alias_bytes"] == pytest.approx(fits["alias_bytes"], rel=0.25)


def test_bad_topologies_and_tasks_are_clear_errors(tmp_path):
    result, _ = _compile("sft", "cpu:3", tmp_path, check=False)  # batch 8 does not split over 3 devices
    assert result.returncode == 2 and "not divisible" in result.stderr
    result = run_cli(
        "compile",
        "sft",
        "--topology",
        "v9z:1x1",
        "--config",
        ROOT / "configs/sft_tiny.yaml",
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2 and "v9z:1x1" in result.stderr
