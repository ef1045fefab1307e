"""`persllm dpo` end to end: starting from an SFT run, step 0, TRL metric names, the reference
cache and the frozen reference."""

import json
import math

import numpy as np
import pytest

from persllm_jax.train.metrics_log import read_metrics
from tests.train_runs import (
    DPO,
    EIGHT_DEVICES,
    ROOT,
    SFT,
    losses,
    train,
)


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


@pytest.mark.slow
def test_packed_dpo_resume_is_exact(tmp_path):
    """Packed DPO (the default), 8 straight steps against 4, a stop, and the same command again:
    every row's input pipeline continues where it stopped, so losses and parameters agree bit
    for bit."""
    from tests.train_runs import assert_same_params

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train("dpo", straight, env=EIGHT_DEVICES)
    train("dpo", resumed, "train.stop_after=4", env=EIGHT_DEVICES)
    assert len(losses(resumed)) == 4
    train("dpo", resumed, env=EIGHT_DEVICES)
    assert losses(resumed) == losses(straight)
    assert_same_params(resumed, straight)


def test_mirrored_pairs_train_in_one_row_of_one_step(tmp_path):
    """`dpo.mirrors_together=true` on the tiny pairs (cached reference): in the reference pass and
    every training step, a pair whose mirror is in the file (the same question and answers,
    chosen and rejected swapped, under another system prompt) is in the same row of the same
    batch as its mirror; every pair is seen; step 1's loss is log 2, so the cached reference was
    computed in the layout the step reads."""
    from persllm_jax import configlib
    from persllm_jax.data import formats
    from persllm_jax.data.readers import read_records
    from persllm_jax.train import loop
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.tasks.dpo import DPOTask, mirror_key

    seen = []

    class Recording(DPOTask):
        def _batch(self, rows):
            batch, keys = super()._batch(rows)
            seen.append(np.asarray(keys[..., 1]))
            return batch, keys

    run_dir = tmp_path / "run"
    cfg = configlib.load(
        RunConfig, DPO, [f"run_dir={run_dir}", "dpo.mirrors_together=true", "train.max_steps=3"]
    )
    loop.train(cfg, Recording)

    records = read_records(ROOT / "tests" / "data" / "pairs.jsonl", split="train")
    groups: dict = {}
    for record in records:
        key, side = mirror_key(formats.preference_example(record))
        groups.setdefault(key, []).append((side, record["_index"]))
    mirror_of = {
        a: b
        for members in groups.values()
        if sorted(side for side, _ in members) == [0, 1]
        for (_, a), (_, b) in (members, members[::-1])
    }
    assert len(mirror_of) >= 16, "the tiny pairs hold mirrored cross-stage pairs"
    together = 0
    for indices in seen:
        for row in indices:
            in_row = set(row[row >= 0].tolist())
            for index in in_row & set(mirror_of):
                assert mirror_of[index] in in_row, (index, sorted(in_row))
                together += 1
    assert together >= len(mirror_of), "every mirrored pair was trained or scored at least once"
    assert {i for indices in seen for i in indices[indices >= 0].tolist()} == {r["_index"] for r in records}
    first = read_metrics(run_dir / "metrics.jsonl")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6


def test_mirror_partners_are_one_pair_and_its_swapped_twin(tmp_path, caplog):
    """Partners (`dpo.mirrors_together`): a pair and the pair with its answers swapped under
    another system prompt share a row, whatever the file's order; a duplicate in the same
    direction, a third pair on the same answers, and pairs of other answers stay single, and the
    loader says how many; and DPO refuses the option where two pairs cannot share a packed row."""
    from persllm_jax import configlib
    from persllm_jax.data import formats
    from persllm_jax.train.config import DataSource, RunConfig
    from persllm_jax.train.tasks import common
    from persllm_jax.train.tasks.dpo import check_settings, mirror_key

    def pair(system, question, chosen, rejected):
        return {
            "prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    records = [
        pair("<TIME-I>", "Where do you live?", "Baker Street.", "Sussex."),  # 0, partner of 5
        pair("<TIME-I>", "Who are you?", "A detective.", "A farmer."),  # 1, duplicated by 2: single
        pair("<TIME-I>", "Who are you?", "A detective.", "A farmer."),  # 2
        pair("<TIME-I>", "Your work?", "Chemistry.", "Bees."),  # 3, two mirrors (4, 6): all single
        pair("<TIME-II>", "Your work?", "Bees.", "Chemistry."),  # 4
        pair("<TIME-II>", "Where do you live?", "Sussex.", "Baker Street."),  # 5
        pair("<TIME-III>", "Your work?", "Bees.", "Chemistry."),  # 6
        pair("<TIME-II>", "Where do you live?", "Sussex.", "Dartmoor."),  # 7, other answers: single
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for batch in (2, 8):
        caplog.clear()
        local, _, rows, partners = common.load_shards(
            [DataSource(path=str(path))],
            formats.preference_example,
            batch,
            set(range(batch)),
            0,
            False,
            mirror_key,
        )
        assert partners == {(0, 0): (0, 5), (0, 5): (0, 0)}
        assert f"{path}: 6 records have no partner to train with" in caplog.text
        assert rows[0][0] == rows[0][5]
        assert len(local[0]) == len(records)
        units = [
            u
            for row in range(batch)
            for u in common.row_units([i for i in local[0] if rows[0][i[0][1]] == row], partners)
        ]
        assert sorted(len(u) for u in units) == [1] * 6 + [2]

    for bad in (["train.packing=false"], ["train.max_segments=1"]):
        cfg = configlib.load(RunConfig, DPO, ["dpo.mirrors_together=true", *bad])
        with pytest.raises(ValueError, match="dpo.mirrors_together needs packed DPO"):
            check_settings(cfg)


def test_a_negative_sft_weight_is_refused():
    from persllm_jax import configlib
    from persllm_jax.train.config import RunConfig
    from persllm_jax.train.tasks.dpo import check_settings

    check_settings(configlib.load(RunConfig, DPO, ["dpo.sft_weight=0.5"]))
    with pytest.raises(ValueError, match=r"dpo.sft_weight=-0.5"):
        check_settings(configlib.load(RunConfig, DPO, ["dpo.sft_weight=-0.5"]))
