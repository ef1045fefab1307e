"""LoRA through `persllm sft` and `persllm dpo`: only the adapters train (every other weight bit for
bit as it started), the run exports merged weights that transformers loads and a PEFT adapter that
peft loads, both with our logits; DPO's `dpo.reference: base` (the adapters off, in the step) gives
log 2 and zero rewards at step 0 and the same step as a reference cached from the base; a LoRA run
resumes exactly."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persllm_jax import configlib
from persllm_jax.io.pretrained import load_pretrained, save_pretrained
from persllm_jax.train.config import RunConfig
from persllm_jax.train.loop import load_initial_model
from persllm_jax.train.metrics_log import read_metrics
from tests.cli_helpers import run_cli
from tests.hf_fixtures import torch_logits
from tests.train_runs import ONE_DEVICE, ROOT, SFT, assert_same_params, losses, train

LORA = ("lora.rank=4", "lora.alpha=8")
TOL = 1e-4  # fp32 logits against PyTorch


def _initial_base(config, *overrides):
    """The run's starting weights without adapters, built in this process as the run builds them."""
    cfg = configlib.load(RunConfig, config, list(overrides))
    model, tokenizer = load_initial_model(cfg, mesh=None)
    return model, tokenizer


STAGE_IDS = [49152, 49153, 49154]  # the tiny config's stage tokens, added past the tokenizer's 49152


def _ids():
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 20)).astype(np.int32)
    ids[:, 1:4] = STAGE_IDS  # a stage token in the system prompt, as in persona data
    return ids


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora_sft") / "run"
    train("sft", run, *LORA, "train.max_steps=4", "train.grad_accum_steps=2", env=ONE_DEVICE)
    return run


def test_only_the_adapters_train(sft_run):
    base, tokenizer = _initial_base(SFT)
    assert tokenizer.convert_tokens_to_ids(["<TIME-I>", "<TIME-II>", "<TIME-III>"]) == STAGE_IDS
    start = _params(base)
    model = load_pretrained(sft_run)[0]
    trained = _params(model)
    adapters = {k: v for k, v in trained.items() if "/lora/" in k or k == "token_rows"}
    assert adapters and set(trained) == set(start) | set(adapters)
    for key, value in start.items():
        np.testing.assert_array_equal(trained[key], value, err_msg=key)  # bit for bit
    moved = [k for k, v in adapters.items() if k.endswith("lora_b") and np.abs(v).max() > 0]
    assert len(moved) == 7, "every adapted projection's lora_b must have trained"
    # lora.train_embeddings_rows=added (the default): the stage tokens' rows train with them; the
    # tiny data's dialogues have stage tokens of two stages, and both rows moved
    assert model.cfg.lora_token_rows == tuple(STAGE_IDS)
    assert (np.abs(trained["token_rows"]).max(axis=1) > 0).sum() >= 2
    run_losses = losses(sft_run)
    assert len(run_losses) == 4 and run_losses[-1] < run_losses[0]


def _params(model) -> dict[str, np.ndarray]:
    """Every parameter (adapters included) by its path, e.g. layers/attn/q_proj/lora/lora_b."""
    return {
        "/".join(map(str, p)): np.asarray(x.get_value())
        for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_merged_and_adapter_exports_give_our_logits(sft_run, tmp_path):
    import peft
    import transformers

    ours, _ = load_pretrained(sft_run)
    assert ours.cfg.lora_rank == 4
    expected = np.asarray(ours(jnp.asarray(_ids())))

    run_cli("export-hf", sft_run, tmp_path / "merged", cwd=ROOT)
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not any(info.values()), info
    np.testing.assert_allclose(torch_logits(merged.eval(), _ids()), expected, atol=TOL, rtol=0)

    result = run_cli("export-hf", sft_run, tmp_path / "adapter", "--adapter", cwd=ROOT)
    assert (
        "resize_token_embeddings(49155)" in result.stdout
        and "peft.PeftModel.from_pretrained" in result.stdout
    )
    # what a user has: the base as it was, without the stage tokens; resized, PEFT gives it our rows
    base, tokenizer = _initial_base(SFT, "model.add_tokens=[]")
    save_pretrained(base, tokenizer, tmp_path / "base")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf_base.resize_token_embeddings(49155)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(with_adapter, _ids()), expected, atol=TOL, rtol=0)


def test_dpo_with_the_base_as_reference(tmp_path):
    base_ref = tmp_path / "base_ref"
    train("dpo", base_ref, *LORA, "dpo.reference=base", "train.max_steps=2", env=ONE_DEVICE)
    first = read_metrics(base_ref / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    # the reference cached from the base (the same weights with new adapters, lora_b zero)
    cached = tmp_path / "cached"
    train("dpo", cached, *LORA, "dpo.reference=cached", "train.max_steps=2", env=ONE_DEVICE)
    np.testing.assert_allclose(losses(base_ref), losses(cached), rtol=1e-6, atol=0)
    assert_same_params(base_ref, cached, atol=1e-6)


def test_the_base_reference_needs_adapters(tmp_path):
    result = train("dpo", tmp_path / "run", "dpo.reference=base", env=ONE_DEVICE, check=False)
    assert result.returncode != 0 and "dpo.reference=base needs LoRA adapters" in result.stderr


def test_a_lora_run_with_dropout_resumes_exactly(sft_run, tmp_path):
    """With lora.dropout the masks follow from the seed and the step: a run cut at step 2 and
    resumed equals the straight run bit for bit. Against `sft_run` (the same run without dropout):
    step 1's loss is equal (lora_b starts at zero, so a dropped adapter input changes no output
    yet) but its gradient is not, and from step 3 on the losses differ too (AdamW's first update is
    about lr times the gradient's sign, which dropout rarely flips, so step 2's loss may agree)."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    common = (*LORA, "lora.dropout=0.1", "train.max_steps=4", "train.grad_accum_steps=2")
    train("sft", straight, *common, env=ONE_DEVICE)
    train("sft", cut, *common, "checkpoint.every_steps=2", "train.stop_after=2", env=ONE_DEVICE)
    train("sft", cut, *common, "checkpoint.every_steps=2", env=ONE_DEVICE)
    assert losses(cut) == losses(straight)
    assert_same_params(straight, cut)
    dropped, kept = read_metrics(straight / "metrics.jsonl"), read_metrics(sft_run / "metrics.jsonl")
    assert dropped[0]["loss"] == pytest.approx(kept[0]["loss"], rel=1e-6)
    assert all(abs(d["grad_norm"] - k["grad_norm"]) > 1e-5 for d, k in zip(dropped, kept, strict=True))
    assert all(abs(d["loss"] - k["loss"]) > 1e-6 for d, k in zip(dropped[2:], kept[2:], strict=True))


def test_generation_from_a_lora_run_equals_its_merged_model(sft_run):
    from persllm_jax import generate
    from persllm_jax.model.lora import merged_model

    model, tokenizer = load_pretrained(sft_run)
    conversation = [[{"role": "user", "content": "Who are you?"}]]
    ours = generate(model, tokenizer, conversation, max_new_tokens=12)
    assert ours == generate(merged_model(model), tokenizer, conversation, max_new_tokens=12)


def test_a_lora_checkpoint_holds_only_the_adapters(sft_run):
    from persllm_jax.io.run_paths import run_model_paths

    _, params_dir, _ = run_model_paths(sft_run)
    saved = sum(f.stat().st_size for f in params_dir.rglob("*") if f.is_file())
    model, _ = load_pretrained(sft_run)
    adapters = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    everything = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # the adapters and Orbax's metadata, far below the base (the tiny model: about 12.6 MB in fp32)
    assert saved < adapters + 2**20 and saved < everything / 20, (saved, adapters, everything)


def test_dpo_from_a_lora_sft_run_starts_from_its_merged_model(sft_run, tmp_path):
    run = tmp_path / "dpo"
    train(
        "dpo", run, *LORA, "dpo.reference=base", "train.max_steps=1", "model.preset=", f"model.path={sft_run}",
        env=ONE_DEVICE,
    )  # fmt: skip
    first = read_metrics(run / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # its base is the SFT run's model with the SFT adapters folded in: the same logits
    from persllm_jax.model.lora import adapters_off, merged_model

    sft_model, _ = load_pretrained(sft_run)
    dpo_model, _ = load_pretrained(run)
    graphdef, state = nnx.split(dpo_model)
    base_logits = np.asarray(nnx.merge(graphdef, adapters_off(state))(jnp.asarray(_ids())))
    np.testing.assert_allclose(
        base_logits, np.asarray(merged_model(sft_model)(jnp.asarray(_ids()))), atol=1e-5, rtol=0
    )
