"""`persllm sft` end to end in real subprocesses: outputs, meshes, kernels, several processes,
export and errors."""

import math
import re

import numpy as np
import pytest

from persllm_jax.io.run_paths import step_dirs
from persllm_jax.train.metrics_log import read_metrics
from tests.cli_helpers import run_cli
from tests.train_runs import (
    EIGHT_DEVICES,
    ONE_DEVICE,
    ROOT,
    _two_processes,
    assert_same_params,
    losses,
    train,
)


def test_sft_run_outputs(sft_reference_run):
    records = read_metrics(sft_reference_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records, "nothing to check"
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert {
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
        "loss/persona=holmes",
        "loss/stage=early",
    } <= records[0].keys()
    assert [s for s, _ in step_dirs(sft_reference_run / "checkpoints")] == [4, 8]
    assert (sft_reference_run / "loss.png").stat().st_size > 1000
    assert list((sft_reference_run / "tensorboard").glob("events.out.tfevents.*"))
    resolved = (sft_reference_run / "config.yaml").read_text()
    assert "max_steps: 8" in resolved


# Final weights of runs on different meshes: equal up to fp32 rounding of differently ordered sums
# (a tenth of one update step, lr 1e-3).
PARAMS_ATOL = 1e-4


@pytest.mark.slow
def test_mesh_222_equals_one_device(sft_reference_run, tmp_path):
    one = tmp_path / "one"
    mesh = tmp_path / "mesh"
    train("sft", one, "mesh.fsdp=1", env=ONE_DEVICE)
    train("sft", mesh, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", env=EIGHT_DEVICES)
    np.testing.assert_allclose(losses(mesh), losses(one), rtol=1e-4)
    np.testing.assert_allclose(losses(sft_reference_run), losses(one), rtol=1e-4)
    # sums over other shards round differently; after 8 AdamW steps at lr 1e-3 the weights agree
    # to well under a step's size
    assert_same_params(mesh, one, atol=PARAMS_ATOL)
    assert_same_params(sft_reference_run, one, atol=PARAMS_ATOL)


@pytest.mark.slow
def test_splash_attention_run_equals_xla(sft_reference_run, tmp_path):
    """The Pallas kernel (interpret mode here), sharded over data, fsdp and tensor, remat on."""
    run_dir = tmp_path / "splash"
    overrides = (
        "model.attention_impl=splash",
        "model.remat=full",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    )
    train("sft", run_dir, *overrides, env=EIGHT_DEVICES)
    assert len(losses(run_dir)) == 8
    np.testing.assert_allclose(losses(run_dir), losses(sft_reference_run), rtol=1e-5)
    from persllm_jax.io.pretrained import read_model_config

    # the kernel is how this machine ran the step; the trained model loads with XLA attention anywhere
    assert read_model_config(run_dir).attention_impl == "xla"


@pytest.mark.slow
def test_two_processes_equal_one(sft_reference_run, tmp_path):
    """Two processes with 4 fake devices each = one process with 8 (fsdp 8 over both), and each
    process reads only the records of its own batch rows."""
    logs = _two_processes(tmp_path / "run")
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(sft_reference_run), rtol=1e-5)
    read = [re.search(r"process (\d) read (\d+) of (\d+) records", log) for log in logs]
    assert all(read), "each process logs what it read"
    counts = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in read}
    assert sorted(counts) == [0, 1]
    total = counts[0][1]
    assert counts[0][0] + counts[1][0] == total and 0 < counts[0][0] < total and 0 < counts[1][0] < total


@pytest.mark.slow
def test_tensor_axis_across_two_processes_equals_one(tmp_path):
    """mesh tensor 8 over two processes: both hold replicas of every batch row, so both must load
    the whole batch; the run equals the same mesh in one process."""
    one = tmp_path / "one"
    train("sft", one, "mesh.fsdp=1", "mesh.tensor=8", env=EIGHT_DEVICES)
    _two_processes(tmp_path / "two", "mesh.fsdp=1", "mesh.tensor=8")
    assert len(losses(one)) == 8
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(one), rtol=1e-6)
    # collectives between processes (gloo) add in another order than within one: fp32 rounding
    assert_same_params(tmp_path / "two", one, atol=1e-6)


def test_export_run_to_hf(sft_reference_run, tmp_path):
    import transformers

    run_cli("export-hf", sft_reference_run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == len(tokenizer) == 49155
    assert tokenizer.encode("<TIME-II>", add_special_tokens=False) == [49153]


# ------------------------------------------------------------------------------------------
# Errors


def test_malformed_jsonl_line_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = (ROOT / "tests" / "data" / "dialogues.jsonl").read_text().splitlines()
    lines[6] = lines[6][:40]
    data.write_text("\n".join(lines) + "\n")
    result = train("sft", tmp_path / "run", f"data.sources=[{{path: {data}}}]", check=False, env=ONE_DEVICE)
    assert result.returncode == 2
    assert f"{data} line 7: invalid JSON" in result.stderr, result.stderr[-2000:]


def test_unknown_key_named(tmp_path):
    result = train("sft", tmp_path / "run", "train.max_stepz=3", check=False, env=ONE_DEVICE)
    assert result.returncode == 2
    assert "unknown config key 'train.max_stepz'" in result.stderr and "max_steps" in result.stderr


def test_batch_not_divisible_named(tmp_path):
    result = train(
        "sft",
        tmp_path / "run",
        "train.batch_size=6",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        check=False,
        env=EIGHT_DEVICES,
    )
    assert result.returncode == 2
    assert "micro-batch size 6" in result.stderr and "data x fsdp = 2 x 2 = 4" in result.stderr


@pytest.mark.slow
def test_resume_onto_another_mesh(sft_reference_run, tmp_path):
    """Checkpoint written on (1, 8, 1), training resumed on (2, 2, 2): same losses (1e-4 relative)."""
    run_dir = tmp_path / "run"
    train("sft", run_dir, "train.stop_after=4", env=EIGHT_DEVICES)
    train("sft", run_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", env=EIGHT_DEVICES)
    np.testing.assert_allclose(losses(run_dir), losses(sft_reference_run), rtol=1e-4)
    assert_same_params(run_dir, sft_reference_run, atol=PARAMS_ATOL)


def test_load_checkpoint_onto_a_mesh(sft_reference_run):
    import jax

    from persllm_jax import load_pretrained
    from persllm_jax.model.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_pretrained(sft_reference_run, mesh=mesh)
    single, _ = load_pretrained(sft_reference_run)
    kernel = sharded.layers.mlp.up_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(single.layers.mlp.up_proj.kernel[...]))


def test_nan_loss_stops_with_message(tmp_path):
    result = train(
        "sft",
        tmp_path / "run",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        check=False,
        env=ONE_DEVICE,
    )
    assert result.returncode == 2
    assert "loss is nan at step" in result.stderr and "Last checkpoint" in result.stderr
