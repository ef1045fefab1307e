"""LoRA adapters on the model: new adapters (lora_b zero) and adapters switched off give exactly the
base model's logits; trained adapters give transformers + PEFT's logits when PEFT loads our adapter
export, and the merged export loads in transformers with no missing or unexpected weights and the
same logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persllm_jax.io.peft_adapter import ADAPTER_CONFIG, save_adapter
from persllm_jax.io.pretrained import load_pretrained, save_pretrained
from persllm_jax.model.lora import adapters_off, add_adapters, merged_model
from tests.hf_fixtures import save_tiny, torch_logits

TOL = 1e-4  # fp32 logits against PyTorch: the same maths in another order


def _ids(seed=0, batch=2, length=24, vocab=320):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def _trained(model):
    """Adapters as training would leave them: lora_b no longer zero."""
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
    noisy = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state)
    nnx.update(model, noisy)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    save_tiny("llama_untied_mqa", out)
    return out


def test_new_adapters_and_adapters_off_give_the_base_logits_exactly(base_dir):
    base, _ = load_pretrained(base_dir)
    ids = jnp.asarray(_ids())
    expected = np.asarray(base(ids))
    model = add_adapters(base, rank=4, alpha=8.0)
    a = [x for p, x in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)) if p[-1] == "lora_a"]
    assert len(a) == 7 and all(np.abs(np.asarray(x.get_value())).max() > 0 for x in a)
    np.testing.assert_array_equal(np.asarray(model(ids)), expected)
    _trained(model)
    assert np.abs(np.asarray(model(ids)) - expected).max() > 1e-3, "trained adapters must change the logits"
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, adapters_off(state))(ids)), expected)


@pytest.mark.parametrize(
    "targets", [None, ("q_proj", "v_proj")], ids=["attention-and-mlp", "queries-and-values"]
)
def test_peft_loads_the_adapter_export_with_equal_logits(base_dir, tmp_path, targets):
    import peft
    import transformers

    base, _ = load_pretrained(base_dir)
    options = {} if targets is None else {"targets": targets}
    model = _trained(add_adapters(base, rank=4, alpha=8.0, **options))
    out = save_adapter(model, tmp_path / "adapter", base_model=str(base_dir))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == (expected if targets is None else set(targets))

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ids = _ids(1)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids))), torch_logits(peft_model, ids), atol=TOL, rtol=0
    )
    # every adapter tensor was loaded: PEFT's own adapter weights equal ours
    loaded = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    per_layer = len(config["target_modules"]) * 2
    assert len(loaded) == per_layer * base.cfg.num_layers


def test_the_merged_export_loads_in_transformers_with_equal_logits(base_dir, tmp_path):
    import transformers

    base, tokenizer = load_pretrained(base_dir)
    model = _trained(add_adapters(base, rank=4, alpha=8.0))
    merged = merged_model(model)
    assert merged.cfg.lora_rank == 0 and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    save_pretrained(merged, tokenizer, tmp_path / "merged")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", output_loading_info=True
    )
    assert not any(info.values()), info
    ids = _ids(2)
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids))), ours, atol=TOL, rtol=0)
    np.testing.assert_allclose(torch_logits(hf.eval(), ids), ours, atol=TOL, rtol=0)


def test_targets_that_match_no_projection_are_refused(base_dir):
    base, _ = load_pretrained(base_dir)
    with pytest.raises(ValueError, match="match no projection; the projections are layers/attn/q_proj"):
        add_adapters(base, rank=4, targets=("attention",))
    with pytest.raises(ValueError, match="is not a regular expression"):
        add_adapters(base, rank=4, targets=("q_proj(",))
