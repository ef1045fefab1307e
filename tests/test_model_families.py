"""Qwen3 and Gemma 3 through the trainer, as a user runs it (`persllm sft` / `dpo` / `export-hf`):
for a tiny model of each family (presets `tiny_qwen3` and `tiny_gemma3`, the latter with a sliding
window of 48 inside its 128-token rows), SFT whose loss falls and that resumes exactly, DPO from it
whose loss falls, and a LoRA run; each of the three resumes exactly (stopped halfway and run again, it
logs the same losses and ends with the same parameters as the run made in one go). Each exports a folder that transformers loads (and the LoRA run a
PEFT adapter that peft loads) with our logits within 1e-4."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax import configlib
from persllm_jax.io.pretrained import load_pretrained, save_pretrained
from persllm_jax.train.config import RunConfig
from persllm_jax.train.loop import load_initial_model
from tests.cli_helpers import run_cli
from tests.hf_fixtures import torch_logits
from tests.train_runs import ONE_DEVICE, ROOT, SFT, assert_same_params, losses, train

TOL = 1e-4  # fp32 logits against PyTorch
STAGE_IDS = [49152, 49153, 49154]  # the tiny configs' stage tokens


def _ids():
    # 160 tokens: past the tiny Gemma's window (48) and past one attention block (128)
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 160)).astype(np.int32)
    ids[:, 1:4] = STAGE_IDS
    return ids


def _exported_logits_match(run_dir, out_dir):
    import transformers

    ours, _ = load_pretrained(run_dir)
    expected = np.asarray(ours(jnp.asarray(_ids())))
    run_cli("export-hf", run_dir, out_dir, cwd=ROOT)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    np.testing.assert_allclose(torch_logits(hf.eval(), _ids()), expected, atol=TOL, rtol=0)
    return ours


def _resumes_exactly(kind, reference, cut, *overrides, stop_after):
    """`cut` stopped after `stop_after` steps and run again equals `reference`, run in one go: the
    same loss at every step (the optimizer state and data position came back) and the same
    parameters, bit for bit."""
    train(kind, cut, *overrides, f"train.stop_after={stop_after}", env=ONE_DEVICE)
    assert len(losses(cut)) == stop_after
    train(kind, cut, *overrides, env=ONE_DEVICE)
    assert losses(cut) == losses(reference)
    assert_same_params(cut, reference)


@pytest.fixture(scope="module", params=["tiny_qwen3", "tiny_gemma3"])
def family(request, tmp_path_factory):
    """The preset and its SFT run (8 steps in one go)."""
    run = tmp_path_factory.mktemp(request.param) / "sft"
    train("sft", run, f"model.preset={request.param}", env=ONE_DEVICE)
    return request.param, run


@pytest.mark.slow
def test_sft_learns_resumes_exactly_and_exports(family, tmp_path):
    preset, reference = family
    steps = losses(reference)
    assert len(steps) == 8 and steps[-1] < steps[0] - 0.5, steps
    _resumes_exactly("sft", reference, tmp_path / "resumed", f"model.preset={preset}", stop_after=4)
    ours = _exported_logits_match(reference, tmp_path / "hf")
    assert ours.cfg.architecture == preset.removeprefix("tiny_")


@pytest.mark.slow
def test_dpo_from_the_sft_run_learns_resumes_exactly_and_exports(family, tmp_path):
    _, sft = family
    run = tmp_path / "dpo"
    from_sft = (f"model.path={sft}", "model.preset=", "model.tokenizer=")
    train("dpo", run, *from_sft, env=ONE_DEVICE)
    steps = losses(run)
    assert abs(steps[0] - np.log(2)) < 1e-5 and steps[-1] < steps[0] - 0.1, steps
    _resumes_exactly("dpo", run, tmp_path / "resumed", *from_sft, stop_after=4)
    _exported_logits_match(run, tmp_path / "hf")


@pytest.mark.slow
def test_lora_resumes_exactly_and_exports_merged_weights_and_a_peft_adapter(family, tmp_path):
    import peft
    import transformers

    preset, _ = family
    run = tmp_path / "lora"
    lora = (f"model.preset={preset}", "lora.rank=4", "lora.alpha=8", "train.max_steps=4")
    train("sft", run, *lora, env=ONE_DEVICE)
    assert losses(run)[-1] < losses(run)[0]
    _resumes_exactly("sft", run, tmp_path / "resumed", *lora, stop_after=2)
    ours = _exported_logits_match(run, tmp_path / "merged")
    assert ours.cfg.lora_rank == 4
    expected = np.asarray(ours(jnp.asarray(_ids())))
    run_cli("export-hf", run, tmp_path / "adapter", "--adapter", cwd=ROOT)
    # what a user has: the base without the stage tokens, resized; PEFT gives it the trained rows
    cfg = configlib.load(RunConfig, SFT, [f"model.preset={preset}", "model.add_tokens=[]"])
    base, tokenizer = load_initial_model(cfg, mesh=None)
    save_pretrained(base, tokenizer, tmp_path / "base")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf_base.resize_token_embeddings(49155)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(with_adapter, _ids()), expected, atol=TOL, rtol=0)
