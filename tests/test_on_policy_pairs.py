"""`dpo.on_policy`: the starting model's own answers to training questions as rejected answers,
sampled once before DPO's first step, trained beside the mined pairs and read again on resume."""

import json

import pytest

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

    run_dir = tmp_path / "run"
    train("dpo", run_dir, *ON_POLICY, "train.max_steps=2", env=EIGHT_DEVICES)
    pairs = [json.loads(line) for line in (run_dir / "on_policy_pairs.jsonl").read_text().splitlines()]
    dialogues = [d for d in read_records(DIALOGUES, split="train") if d["kind"] == "ordinary"]
    assert len(dialogues) == 42 and len(pairs) == len(dialogues)
    assert (run_dir / "on_policy_pairs.origin.json").is_file()
    assert [p["id"] for p in pairs] == [f"{d['id']}/on_policy" for d in dialogues]
    cfg = configlib.load(RunConfig, DPO, [])
    model, tokenizer = load_initial_model(cfg, make_mesh(1, 8, 1))
    prompts = [d["messages"][:-1] for d in dialogues]
    expected = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, top_p=0.95, seed=0)
    assert len(set(expected)) == len(expected), "the rows' seeds differ"
    for pair, dialogue, reply in zip(pairs, dialogues, expected):
        assert pair["prompt"] == dialogue["messages"][:-1]
        assert pair["chosen"] == [dialogue["messages"][-1]]
        assert pair["rejected"] == [{"role": "assistant", "content": reply}]
        assert (pair["source"], pair["split"], pair["persona"]) == ("on_policy", "train", dialogue["persona"])
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert (
        "rewards/margins/source=on_policy" in metrics[0]
        and "rewards/margins/source=cross_stage" in metrics[0]
    )


def test_pairs_in_the_run_directory_are_read_not_sampled_again(tmp_path):
    from persllm_jax import configlib
    from persllm_jax.data.readers import DataError
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.tasks.on_policy import FILE_NAME, sampled_from, with_on_policy_pairs

    def no_sampling():
        raise AssertionError("sampled again")

    cfg = configlib.load(RunConfig, DPO, ON_POLICY[:2] + ["dpo.on_policy.repeats=0.5"])
    (tmp_path / FILE_NAME).write_text("")
    (tmp_path / "on_policy_pairs.origin.json").write_text(sampled_from(cfg))
    found = with_on_policy_pairs(cfg, tmp_path, None, None, no_sampling, None)
    assert found.data.sources[:-1] == cfg.data.sources
    assert (found.data.sources[-1].path, found.data.sources[-1].repeats) == (str(tmp_path / FILE_NAME), 0.5)
    assert (
        with_on_policy_pairs(configlib.load(RunConfig, DPO, []), tmp_path, None, None, no_sampling, None).data
        == cfg.data
    )

    # pairs of another starting model in the directory are sampled again
    other = configlib.load(RunConfig, DPO, [*ON_POLICY[:2], "dpo.on_policy.repeats=0.5", "model.seed=1"])
    with pytest.raises(AssertionError, match="sampled again"):
        with_on_policy_pairs(other, tmp_path, None, None, no_sampling, no_sampling)

    none = configlib.load(RunConfig, DPO, [f"dpo.on_policy.dialogues={DIALOGUES}"])  # kinds: induced
    with pytest.raises(DataError, match=rf"{DIALOGUES}: no train-split dialogue of kind induced"):
        with_on_policy_pairs(none, tmp_path / "fresh", None, None, no_sampling, no_sampling)
