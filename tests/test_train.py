"""`persllm sft` / `persllm dpo` end to end in real subprocesses: resume, preemption, meshes,
multiple processes, reference caching, errors."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from persllm_jax.io.run_paths import step_dirs
from persllm_jax.llm.loopback import free_port
from persllm_jax.train.metrics_log import read_metrics
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft_tiny.yaml"
DPO = ROOT / "configs" / "dpo_tiny.yaml"
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def train(kind, run_dir, *overrides, env=None, check=True):
    config = SFT if kind == "sft" else DPO
    return run_cli(kind, "--config", config, f"run_dir={run_dir}", *overrides, env=env, check=check, cwd=ROOT)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def final_params(run_dir):
    import jax

    from persllm_jax import load_pretrained
    from persllm_jax.io.pretrained import params_tree

    model, _ = load_pretrained(run_dir)
    return {
        "/".join(map(str, k)): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params_tree(model))[0]
    }


def assert_same_params(a, b, atol=0.0):
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], atol=atol, rtol=0, err_msg=key)


@pytest.fixture(scope="module")
def sft_reference_run(tmp_path_factory):
    """8 steps in one go, on 8 devices with the default mesh (fsdp = 8)."""
    run_dir = tmp_path_factory.mktemp("sft_reference") / "run"
    train("sft", run_dir, env=EIGHT_DEVICES)
    return run_dir


def test_sft_run_outputs(sft_reference_run):
    records = read_metrics(sft_reference_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
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


def test_dpo_from_an_sft_run_keeps_its_stage_token_rows(sft_reference_run):
    """DPO's config lists the stage tokens and starts from the SFT run: the weights it starts
    from are the SFT run's, stage-token rows included, bit for bit."""
    from persllm_jax import configlib
    from persllm_jax.model.sharding import make_mesh
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.loop import load_initial_model

    cfg = configlib.load(
        RunConfig, DPO, [f"model.path={sft_reference_run}", "model.preset=", "model.tokenizer="]
    )
    assert cfg.model.add_tokens == ("<TIME-I>", "<TIME-II>", "<TIME-III>")
    model, tokenizer = load_initial_model(cfg, make_mesh(1, 8, 1))
    ids = tokenizer.convert_tokens_to_ids(list(cfg.model.add_tokens))
    from persllm_jax import load_pretrained

    sft = np.asarray(load_pretrained(sft_reference_run)[0].embed[...])
    np.testing.assert_array_equal(np.asarray(model.embed[...]), sft)
    initial = final_params_of_preset_with_tokens()
    assert np.abs(sft[ids] - initial[ids]).max() > 0, "SFT moved the stage-token rows"


def final_params_of_preset_with_tokens():
    """The tiny preset's embedding after adding the stage tokens, before any training."""
    from persllm_jax import configlib
    from persllm_jax.model.sharding import make_mesh
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.loop import load_initial_model

    model, _ = load_initial_model(configlib.load(RunConfig, SFT), make_mesh(1, 8, 1))
    return np.asarray(model.embed[...])


@pytest.mark.slow
def test_stop_and_resume_is_exact(sft_reference_run, tmp_path):
    run_dir = tmp_path / "run"
    train("sft", run_dir, "train.stop_after=4", env=EIGHT_DEVICES)
    assert [s for s, _ in step_dirs(run_dir / "checkpoints")] == [4]
    assert len(losses(run_dir)) == 4
    train("sft", run_dir, env=EIGHT_DEVICES)
    assert losses(run_dir) == losses(sft_reference_run)
    assert_same_params(run_dir, sft_reference_run)


def _wait_for(predicate, process, timeout=600):
    start = time.time()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.returncode}\n{process.stderr.read()}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def _start(kind, run_dir, *overrides):
    config = SFT if kind == "sft" else DPO
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "persllm_jax.cli",
            kind,
            "--config",
            str(config),
            f"run_dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        env={**os.environ, **EIGHT_DEVICES},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_cut_sequences_are_counted_and_reported(tmp_path):
    """seq_len 48 cuts some of the tiny dialogues: the per-step counts equal a count made here by
    tokenizing each step's examples, and the run warns and sums them up."""
    import transformers

    from persllm_jax import configlib
    from persllm_jax.data import Mixture, read_records, sft_example, tokenize_sft
    from persllm_jax.train.config import RunConfig

    run_dir = tmp_path / "run"
    result = train("sft", run_dir, "train.seq_len=48", "train.max_steps=3", env=EIGHT_DEVICES)
    cfg = configlib.load(RunConfig, SFT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / cfg.model.tokenizer)
    tokenizer.add_tokens(list(cfg.model.add_tokens), special_tokens=True)
    sources = [
        [sft_example(r) for r in read_records(ROOT / s.path, split=s.split or None)] for s in cfg.data.sources
    ]
    mixture = Mixture(
        tuple(map(len, sources)), tuple(s.repeats for s in cfg.data.sources), cfg.data.shuffle_seed
    )
    expected = []
    for step in range(3):
        lengths = [
            len(tokenize_sft(tokenizer, sources[s][i]).input_ids) for s, i in mixture.global_batch(step, 8)
        ]
        expected.append(sum(n > 48 for n in lengths))
    assert sum(expected) > 0, "the test needs sequences longer than 48 tokens"
    assert [r["truncated"] for r in read_metrics(run_dir / "metrics.jsonl")] == expected
    assert "were longer than train.seq_len=48 and were cut" in result.stderr
    assert f"truncation: {sum(expected)} of 24 sequences" in result.stderr


@pytest.mark.slow
def test_resume_with_a_changed_config(sft_reference_run, tmp_path):
    """Settings that make the run another one stop the resume, each named with old and new
    value; checkpoint cadence does not; an explicit allow keeps the earlier config."""
    run_dir = tmp_path / "run"
    train("sft", run_dir, "train.stop_after=4", env=EIGHT_DEVICES)
    other = tmp_path / "other_model"
    result = train(
        "sft", run_dir, "optim.lr=3e-4", "train.max_steps=16", f"model.path={other}", "model.preset=",
        env=EIGHT_DEVICES, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    for line in ("optim.lr: 0.001 -> 0.0003", "train.max_steps: 8 -> 16", f"model.path: '' -> '{other}'"):
        assert line in result.stderr, result.stderr[-2000:]
    assert "train.allow_config_change=true" in result.stderr
    assert not (run_dir / "config_history").exists()

    train("sft", run_dir, "checkpoint.every_steps=2", "train.stop_after=6", env=EIGHT_DEVICES)
    assert (run_dir / "config_history" / "until_step_4.yaml").is_file()
    assert "every_steps: 2" in (run_dir / "config.yaml").read_text()
    train("sft", run_dir, "checkpoint.every_steps=2", env=EIGHT_DEVICES)
    assert losses(run_dir) == losses(sft_reference_run)

    train("sft", run_dir, "train.max_steps=10", "train.allow_config_change=true", env=EIGHT_DEVICES)
    assert len(losses(run_dir)) == 10
    assert "max_steps: 8" in (run_dir / "config_history" / "until_step_8.yaml").read_text()


@pytest.mark.slow
def test_the_same_data_under_another_path_resumes(sft_reference_run, tmp_path):
    """The data fingerprint covers content, not where the files are."""
    import shutil

    first, moved = tmp_path / "first", tmp_path / "moved"
    first.mkdir()
    for name in ("dialogues.jsonl", "general.jsonl"):
        shutil.copy(ROOT / "tests" / "data" / name, first / name)

    def sources(folder):
        return (
            f"data.sources=[{{path: {folder}/dialogues.jsonl, repeats: 5, split: train}}, "
            f"{{path: {folder}/general.jsonl, repeats: 1}}]"
        )

    run_dir = tmp_path / "run"
    train("sft", run_dir, sources(first), "train.stop_after=4", env=EIGHT_DEVICES)
    first.rename(moved)
    train("sft", run_dir, sources(moved), env=EIGHT_DEVICES)
    assert losses(run_dir) == losses(sft_reference_run)


@pytest.mark.slow
def test_sigkill_after_checkpoint_resumes_exactly(sft_reference_run, tmp_path):
    run_dir = tmp_path / "run"
    # a slower step (bigger batch of work per step is not needed: the checkpoint is awaited)
    process = _start("sft", run_dir)
    _wait_for(lambda: 4 in [s for s, _ in step_dirs(run_dir / "checkpoints")], process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    train("sft", run_dir, env=EIGHT_DEVICES)
    assert losses(run_dir) == losses(sft_reference_run)
    assert_same_params(run_dir, sft_reference_run)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    process = _start("sft", run_dir, "train.max_steps=400", "checkpoint.every_steps=1000")
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    saved = [s for s, _ in step_dirs(run_dir / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 400
    assert "stopped after step" in err


@pytest.mark.slow
def test_mesh_222_equals_one_device(sft_reference_run, tmp_path):
    one = tmp_path / "one"
    mesh = tmp_path / "mesh"
    train("sft", one, "mesh.fsdp=1", env=ONE_DEVICE)
    train("sft", mesh, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", env=EIGHT_DEVICES)
    np.testing.assert_allclose(losses(mesh), losses(one), rtol=1e-4)
    np.testing.assert_allclose(losses(sft_reference_run), losses(one), rtol=1e-4)


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


def _two_processes(run_dir, *overrides, wait=True):
    """`persllm sft` as two processes with 4 fake devices each, joined by jax.distributed on loopback."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    distributed = (
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
    )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "persllm_jax.cli",
                "sft",
                "--config",
                str(SFT),
                f"run_dir={run_dir}",
                *distributed,
                f"distributed.process_id={pid}",
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid in range(2)
    ]
    if not wait:
        return processes
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(sft_reference_run, tmp_path):
    """Two processes with 4 fake devices each = one process with 8 (fsdp 8 over both)."""
    _two_processes(tmp_path / "run")
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(sft_reference_run), rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """The coordination service passes the notice on: both processes save the same checkpoint
    and exit 0, though only process 1 got the signal."""
    run_dir = tmp_path / "run"
    processes = _two_processes(run_dir, "train.max_steps=400", "checkpoint.every_steps=1000", wait=False)
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2, processes[0])
    processes[1].send_signal(signal.SIGTERM)
    errors = []
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        errors.append(err)
    saved = [s for s, _ in step_dirs(run_dir / "checkpoints")]
    assert len(saved) == 1 and 2 <= saved[0] < 400
    assert all(f"saves a checkpoint at step {saved[0]}" in err for err in errors)


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


# ------------------------------------------------------------------------------------------
# DPO


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = train("dpo", run_dir, "train.stop_after=4", env=EIGHT_DEVICES)
    return run_dir, result


def test_dpo_step0_is_log2_and_metrics_named_like_trl(dpo_run):
    run_dir, result = dpo_run
    first = read_metrics(run_dir / "metrics.jsonl")[0]
    # step 1's metrics are computed before its update: policy == reference
    assert abs(first["loss"] - math.log(2)) < 1e-6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-6, key
    # (accuracy compares rewards that are equal up to float rounding, so it is not asserted)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert {
        "rewards/accuracies/persona=holmes",
        "rewards/margins/stage=late",
        "loss/persona=darwin",
    } <= first.keys()
    assert "reference log-probs computed and cached" in result.stderr


def test_dpo_restart_reads_reference_cache(dpo_run):
    run_dir, _ = dpo_run
    cache = list((run_dir / "reference_logps").glob("*.npz"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime_ns
    result = train("dpo", run_dir, env=EIGHT_DEVICES)
    assert "reference log-probs loaded from cache" in result.stderr
    assert "computed and cached" not in result.stderr
    assert cache[0].stat().st_mtime_ns == mtime
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["rewards/accuracies"] > 0.5


@pytest.mark.slow
def test_dpo_frozen_reference_matches_cached(dpo_run, tmp_path):
    run_dir, _ = dpo_run
    frozen = tmp_path / "frozen"
    train("dpo", frozen, "dpo.reference=frozen", env=EIGHT_DEVICES)
    cached = losses(run_dir)  # 4 steps, or 8 once the restart test has run: either order works
    assert len(cached) >= 4
    np.testing.assert_allclose(losses(frozen)[: len(cached)], cached, rtol=1e-4)


@pytest.mark.slow
def test_reference_cache_follows_weights_tokenizer_and_seq_len(tmp_path):
    """With no checkpoint the starting weights are loaded again: the same weights read the cache;
    other weights (model.seed), another chat template or seq_len compute new log-probs."""
    import shutil

    run_dir = tmp_path / "run"
    template_dir = tmp_path / "tokenizer"
    shutil.copytree(ROOT / "tests" / "data" / "tokenizer", template_dir)
    template = template_dir / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))

    def run(*overrides):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # as after a crash before any checkpoint
        result = train("dpo", run_dir, "train.max_steps=1", *overrides, env=EIGHT_DEVICES)
        computed = "reference log-probs computed and cached" in result.stderr
        loaded = "reference log-probs loaded from cache" in result.stderr
        assert computed != loaded, result.stderr[-2000:]
        return computed

    assert run() is True
    assert run() is False  # same weights, data and settings
    assert run("model.seed=1") is True
    assert run(f"model.tokenizer={template_dir}") is True
    assert run("train.seq_len=96") is True
    assert len(list((run_dir / "reference_logps").glob("*.npz"))) == 4


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
