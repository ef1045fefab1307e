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
from tests.train_runs import ROOT

TOL = 1e-4  # fp32 logits against PyTorch: the same maths in another order
ROWS = (3, 11)  # vocabulary rows trained with the adapters (ids that `_ids` gives often)


def _ids(seed=0, batch=2, length=24, vocab=320):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)
    ids[:, 2], ids[:, 9] = ROWS  # the trained rows' tokens, in every row
    return ids


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


@pytest.fixture(scope="module")
def tied_base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tied_base")
    save_tiny("llama_tied_gqa", out)
    return out


@pytest.mark.parametrize("rows", [(), ROWS], ids=["adapters", "adapters-and-rows"])
def test_new_adapters_and_adapters_off_give_the_base_logits_exactly(base_dir, rows):
    base, _ = load_pretrained(base_dir)
    ids = jnp.asarray(_ids())
    assert np.isin(np.asarray(ids), ROWS).any()
    expected = np.asarray(base(ids))
    model = add_adapters(base, rank=4, alpha=8.0, token_rows=rows)
    a = [x for p, x in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)) if p[-1] == "lora_a"]
    assert len(a) == 7 and all(np.abs(np.asarray(x.get_value())).max() > 0 for x in a)
    np.testing.assert_array_equal(np.asarray(model(ids)), expected)
    _trained(model)
    assert np.abs(np.asarray(model(ids)) - expected).max() > 1e-3, "trained adapters must change the logits"
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, adapters_off(state))(ids)), expected)


def test_trained_rows_change_only_their_tokens_embedding(base_dir):
    """Trained rows alone (lora_b zero): the hidden states of a sequence without those ids are the
    base's exactly; with one of them, they differ."""
    base, _ = load_pretrained(base_dir)
    model = add_adapters(base, rank=4, alpha=8.0, token_rows=ROWS)
    rows = nnx.state(model, nnx.LoRAParam)["token_rows"]
    rows.set_value(rows.get_value() + 0.5)
    without = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(model.hidden_states(without)), np.asarray(base.hidden_states(without))
    )
    with_row = jnp.asarray([[5, 3, 7, 8]], jnp.int32)
    assert np.abs(np.asarray(model.hidden_states(with_row) - base.hidden_states(with_row))).max() > 1e-3


@pytest.mark.parametrize(
    "targets,rows,tied",
    [(None, (), False), (("q_proj", "v_proj"), (), False), (None, ROWS, False), (None, ROWS, True)],
    ids=["attention-and-mlp", "queries-and-values", "with-rows-untied", "with-rows-tied"],
)
def test_peft_loads_the_adapter_export_with_equal_logits(
    base_dir, tied_base_dir, tmp_path, targets, rows, tied
):
    import peft
    import transformers

    source = tied_base_dir if tied else base_dir
    base, _ = load_pretrained(source)
    options = {} if targets is None else {"targets": targets}
    model = _trained(add_adapters(base, rank=4, alpha=8.0, token_rows=rows, **options))
    out = save_adapter(model, tmp_path / "adapter", base_model=str(source))
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == (expected if targets is None else set(targets))
    if rows:  # PEFT's trainable tokens: the input rows (tied: also the output rows), else both
        want = list(rows) if tied else {"embed_tokens": list(rows), "lm_head": list(rows)}
        assert config["trainable_token_indices"] == want

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(source)
    peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ids = _ids(1)
    assert not rows or np.isin(ids, rows).any()
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids))), torch_logits(peft_model, ids), atol=TOL, rtol=0
    )
    # every adapter tensor was loaded: PEFT's own adapter weights equal ours
    loaded = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    per_layer = len(config["target_modules"]) * 2
    assert len(loaded) == per_layer * base.cfg.num_layers


def test_peft_gets_the_added_tokens_rows_from_the_adapter(tmp_path):
    """Tokens added to the base (stage tokens, rows at the mean of the others): a user resizes the
    original base's embeddings, whose new rows are not ours, and PEFT writes our rows over them."""
    import peft
    import transformers

    from persllm_jax.io.vocabulary import add_special_tokens

    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "tests" / "data" / "tokenizer")
    base_dir = tmp_path / "base"
    save_tiny("llama_untied_mqa", base_dir, vocab_size=len(tokenizer))  # the tokenizer's own base
    base, _ = load_pretrained(base_dir)
    grown = add_special_tokens(base, tokenizer, ["<TIME-I>", "<TIME-II>"])
    added = tokenizer.convert_tokens_to_ids(["<TIME-I>", "<TIME-II>"])
    model = _trained(add_adapters(grown, rank=4, alpha=8.0, token_rows=tuple(added[:1])))
    out = save_adapter(model, tmp_path / "adapter", str(base_dir), tokenizer, added_token_ids=added)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["trainable_token_indices"] == {
        "embed_tokens": added, "lm_head": added,
    }  # fmt: skip
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    hf_base.resize_token_embeddings(len(tokenizer))
    peft_model = peft.PeftModel.from_pretrained(hf_base, out).eval()
    ids = np.concatenate([_ids(3)[:, :10], np.asarray([added * 2, added[::-1] * 2])], axis=1).astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids))), torch_logits(peft_model, ids), atol=TOL, rtol=0
    )


def test_the_merged_export_loads_in_transformers_with_equal_logits(base_dir, tmp_path):
    import transformers

    base, tokenizer = load_pretrained(base_dir)
    model = _trained(add_adapters(base, rank=4, alpha=8.0, token_rows=ROWS))
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


def test_dropout_drops_only_the_adapters_input_and_only_in_training():
    """An adapted projection with A and B the identity (rank = width, scale 1): its output minus the
    base path is exactly the adapter's input, so the drawn mask can be read off. A quarter of the
    entries are zero (within 5 binomial standard deviations), every kept one is x / (1 - rate)
    exactly, two keys draw different masks, and without a key (evaluation) nothing drops."""
    from persllm_jax.model.config import ModelConfig
    from persllm_jax.model.layers import Linear

    rate, width = 0.25, 16
    cfg = ModelConfig(
        vocab_size=32, hidden_size=width, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
        lora_rank=width, lora_alpha=float(width), lora_dropout=rate,
    )  # fmt: skip
    proj = Linear(
        width, width, ("embed", "heads"), bias=False, cfg=cfg, rngs=nnx.Rngs(0), path="layers/attn/q_proj"
    )
    proj.lora.lora_a.set_value(jnp.eye(width))
    proj.lora.lora_b.set_value(jnp.eye(width))
    x = jax.random.uniform(jax.random.key(1), (8, 512, width), minval=0.5, maxval=1.5)
    base = np.asarray(x @ proj.kernel[...])
    np.testing.assert_allclose(np.asarray(proj(x)) - base, np.asarray(x), rtol=1e-5, atol=1e-5)
    adapter_in = np.asarray(proj(x, jax.random.key(2))) - base
    dropped = np.abs(adapter_in) < 1e-3  # a kept entry is at least 0.5 / 0.75
    n = dropped.size
    assert abs(dropped.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(
        adapter_in[~dropped], np.asarray(x)[~dropped] / (1 - rate), rtol=1e-5, atol=1e-5
    )
    other = np.abs(np.asarray(proj(x, jax.random.key(3))) - base) < 1e-3
    assert (other != dropped).mean() > 0.2, "another key must draw another mask"


def test_a_dropout_model_without_a_key_gives_the_same_logits_as_without_dropout(base_dir):
    base, _ = load_pretrained(base_dir)
    ids = jnp.asarray(_ids())
    plain = _trained(add_adapters(base, rank=4, alpha=8.0))
    dropping = add_adapters(base, rank=4, alpha=8.0, dropout=0.3)
    nnx.update(dropping, nnx.state(plain, nnx.LoRAParam))
    np.testing.assert_array_equal(np.asarray(dropping(ids)), np.asarray(plain(ids)))
    trained = np.asarray(dropping.hidden_states(ids, dropout_key=jax.random.key(0)))
    assert np.abs(trained - np.asarray(plain.hidden_states(ids))).max() > 1e-3, "a key must drop"
