"""`dpo.on_policy`: the starting model's own answers to training questions as rejected answers,
sampled once before DPO's first step, trained beside the mined pairs and read again on resume."""

import json

import pytest
from flax import nnx

from persllm_jax.data.readers import read_records
from persllm_jax.train.metrics_log import read_metrics
from tests.train_runs import DPO, EIGHT_DEVICES, ROOT, train

DIALOGUES = ROOT / "tests" / "data" / "dialogues.jsonl"
ON_POLICY = [
    f"dpo.on_policy.dialogues={DIALOGUES}",
    "dpo.on_policy.kinds=[ordinary]",  # the tiny data has no induced question
    "dpo.on_policy.temperature=1.0",  # a random tiny model's greedy answer is blank lines
    "dpo.on_policy.max_new_tokens=8",
]


def test_the_starting_models_answers_are_the_rejected_side(tmp_path):
    """Every train-split dialogue of the kind gives one pair: its prompt, its own answer chosen,
    and rejected what `generate` samples with the weights DPO starts from and the same seeds; the run
    trains on them beside the mined pairs."""
    from persllm_jax import configlib, generate
    from persllm_jax.model.sharding import make_mesh
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.loop import load_initial_model
    from persllm_jax.train.tasks.on_policy import sampled_from
    from persllm_jax.train.tasks.reference_cache import weights_fingerprint

    run_dir = tmp_path / "run"
    first = train("dpo", run_dir, *ON_POLICY, "train.max_steps=2", "train.stop_after=1", env=EIGHT_DEVICES)
    assert "on-policy pairs: 42 of 42 answers sampled" in first.stderr
    written = (run_dir / "on_policy_pairs.jsonl").read_bytes()
    # the same command resumes from step 1 on the pairs the first start sampled, sampling nothing
    resumed = train("dpo", run_dir, *ON_POLICY, "train.max_steps=2", env=EIGHT_DEVICES)
    assert "on-policy pairs:" not in resumed.stderr and "resumed from step 1" in resumed.stderr
    assert (run_dir / "on_policy_pairs.jsonl").read_bytes() == written
    pairs = [json.loads(line) for line in written.decode().splitlines()]
    dialogues = [d for d in read_records(DIALOGUES, split="train") if d["kind"] == "ordinary"]
    assert len(dialogues) == 42 and len(pairs) == len(dialogues)
    assert [p["id"] for p in pairs] == [f"{d['id']}/on_policy" for d in dialogues]
    cfg = configlib.load(RunConfig, DPO, ON_POLICY)
    model, tokenizer = load_initial_model(cfg, make_mesh(1, 8, 1))
    origin = json.loads((run_dir / "on_policy_pairs.origin.json").read_text())
    assert origin == json.loads(sampled_from(cfg, weights_fingerprint(nnx.split(model)[1])))
    assert origin["model"]["weights"] and origin["temperature"] == 1.0 and "repeats" not in origin
    prompts = [d["messages"][:-1] for d in dialogues]
    expected = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=0)
    assert len(set(expected)) == len(expected), "the rows' seeds differ"
    for pair, dialogue, reply in zip(pairs, dialogues, expected):
        assert pair["prompt"] == dialogue["messages"][:-1]
        assert pair["chosen"] == [dialogue["messages"][-1]]
        assert pair["rejected"] == [{"role": "assistant", "content": reply}]
        assert (pair["source"], pair["split"], pair["persona"]) == ("on_policy", "train", dialogue["persona"])
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert (
        "rewards/margins/source=on_policy" in metrics[0]
        and "rewards/margins/source=cross_stage" in metrics[0]
    )


def test_pairs_of_the_same_weights_are_read_and_others_sampled_again(tmp_path):
    """A fresh start reads the pairs in its run directory only when they were sampled from the same
    weights with the same settings; a resumed run always reads them, and without them stops."""
    import jax.numpy as jnp

    from persllm_jax import configlib
    from persllm_jax.data.readers import DataError
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.tasks.on_policy import (
        FILE_NAME,
        ORIGIN_FILE_NAME,
        sampled_from,
        with_on_policy_pairs,
    )
    from persllm_jax.train.tasks.reference_cache import weights_fingerprint

    def no_sampling(*_):
        raise AssertionError("sampled again")

    weights = nnx.State({"w": jnp.ones((2, 3))})
    cfg = configlib.load(RunConfig, DPO, [*ON_POLICY, "dpo.on_policy.repeats=0.5"])
    (tmp_path / FILE_NAME).write_text("")
    (tmp_path / ORIGIN_FILE_NAME).write_text(sampled_from(cfg, weights_fingerprint(weights)))
    found = with_on_policy_pairs(cfg, tmp_path, None, None, weights, no_sampling)
    assert found.data.sources[:-1] == cfg.data.sources
    assert (found.data.sources[-1].path, found.data.sources[-1].repeats) == (str(tmp_path / FILE_NAME), 0.5)
    off = configlib.load(RunConfig, DPO, [])
    assert with_on_policy_pairs(off, tmp_path, None, None, weights, no_sampling).data == cfg.data

    # other weights: sampled again (the tiny data has no induced question, which the error names)
    other = nnx.State({"w": jnp.zeros((2, 3))})
    induced = configlib.load(RunConfig, DPO, [f"dpo.on_policy.dialogues={DIALOGUES}"])
    (tmp_path / ORIGIN_FILE_NAME).write_text(sampled_from(induced, weights_fingerprint(weights)))
    with pytest.raises(DataError, match=rf"{DIALOGUES}: no train-split dialogue of kind induced"):
        with_on_policy_pairs(induced, tmp_path, None, None, other, no_sampling)

    # a resume reads whatever is there, and names the file when it is gone
    assert with_on_policy_pairs(induced, tmp_path, None, None, no_sampling, no_sampling).data != induced.data
    (tmp_path / FILE_NAME).unlink()
    with pytest.raises(DataError, match=rf"{tmp_path / FILE_NAME}: missing; this resumed run"):
        with_on_policy_pairs(induced, tmp_path, None, None, no_sampling, no_sampling)
