"""Resuming training: exact resume after a stop, SIGKILL or SIGTERM (one or two processes), a
changed config, the data under another path, and truncation counts across a run."""

import signal

import pytest

from persllm_jax.io.run_paths import step_dirs
from persllm_jax.train.metrics_log import read_metrics
from tests.train_runs import (
    EIGHT_DEVICES,
    ROOT,
    SFT,
    _start,
    _two_processes,
    _wait_for,
    assert_same_params,
    losses,
    train,
)


@pytest.mark.slow
def test_stop_and_resume_is_exact(sft_reference_run, tmp_path):
    run_dir = tmp_path / "run"
    train("sft", run_dir, "train.stop_after=4", env=EIGHT_DEVICES)
    assert [s for s, _ in step_dirs(run_dir / "checkpoints")] == [4]
    assert len(losses(run_dir)) == 4
    train("sft", run_dir, env=EIGHT_DEVICES)
    assert losses(run_dir) == losses(sft_reference_run)
    assert_same_params(run_dir, sft_reference_run)


@pytest.mark.slow
def test_cut_sequences_are_counted_and_reported(tmp_path):
    """seq_len 48 cuts some of the tiny dialogues: the per-step counts (unpacked: one example per
    row) equal a count made here by tokenizing each row's examples in the documented order (row
    r reads the records dealt to it, in its own mixture order), and the run warns and sums them up."""
    import transformers

    from persllm_jax import configlib
    from persllm_jax.data import Mixture, read_records, sft_example, tokenize_sft
    from persllm_jax.data.pipeline import row_of_records
    from persllm_jax.data.readers import count_records
    from persllm_jax.train.config import RunConfig

    run_dir = tmp_path / "run"
    result = train(
        "sft", run_dir, "train.seq_len=48", "train.max_steps=3", "train.packing=false", env=EIGHT_DEVICES
    )
    cfg = configlib.load(RunConfig, SFT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / cfg.model.tokenizer)
    tokenizer.add_tokens(list(cfg.model.add_tokens), special_tokens=True)
    batch, seed = cfg.train.batch_size, cfg.data.shuffle_seed
    records = [read_records(ROOT / s.path, split=s.split or None) for s in cfg.data.sources]
    dealt = [row_of_records(count_records(ROOT / s.path), batch, seed) for s in cfg.data.sources]
    expected = [0, 0, 0]
    for row in range(batch):
        shard = [
            [sft_example(r) for r in source if rows[r["_index"]] == row]
            for source, rows in zip(records, dealt)
        ]
        order = Mixture(tuple(map(len, shard)), tuple(s.repeats for s in cfg.data.sources), seed, stream=row)
        for step, (s, i) in enumerate(order.examples(0, 3)):
            expected[step] += len(tokenize_sft(tokenizer, shard[s][i]).input_ids) > 48
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
