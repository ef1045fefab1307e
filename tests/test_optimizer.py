"""The optimizer users expect: weight decay on the matrices and embeddings, not on norm weights or
biases (as Hugging Face and TRL train), unless asked; settings that would train wrongly refused."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import init_model
from persllm_jax.train.config import LoraSection, ModelSection, OptimSection, RunConfig, TrainSection
from persllm_jax.train.loop import check_training_settings, lr_token_rows
from persllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from persllm_jax.train.state import init_state

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_layers=2,
    qkv_bias=True,
    tie_word_embeddings=False,
)
# What Hugging Face's Trainer leaves undecayed, by parameter name.
UNDECAYED = {"bias", "weight"}  # biases, and the norms' gains (every norm parameter is a `weight`)


def _step_with_zero_gradients(optim: OptimSection):
    """One update from zero gradients: Adam's part is 0, so only weight decay moves a parameter."""
    _, params = nnx.split(init_model(CFG))
    optimizer = make_optimizer(optim, max_steps=10)
    state = init_state(params, optimizer)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, state.opt_state, params)
    return params, jax.tree.map(lambda p, u: p + u, params, updates)


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_skips_norms_and_biases_by_default(decay_all):
    optim = OptimSection(lr=1e-2, warmup_steps=0, weight_decay=0.1, decay_norms_and_biases=decay_all)
    lr = float(learning_rate_schedule(optim, 10)(0))
    assert lr > 0
    before, after = _step_with_zero_gradients(optim)
    seen = {"decayed": 0, "kept": 0}
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        name = [getattr(k, "key", None) for k in path if getattr(k, "key", None) is not None][-1]
        old, new = np.asarray(old), np.asarray(new)
        if name in UNDECAYED and not decay_all:
            np.testing.assert_array_equal(new, old, err_msg=str(path))
            seen["kept"] += 1
        else:  # decoupled decay: p - lr * wd * p
            np.testing.assert_allclose(new, old * (1 - lr * 0.1), rtol=1e-6, atol=1e-9, err_msg=str(path))
            seen["decayed"] += 1
    # 7 kernels, embed and lm_head decay; the q/k/v biases and the 3 norms (2 stacked per layer, final) do not
    assert seen == ({"decayed": 9 + 6, "kept": 0} if decay_all else {"decayed": 9, "kept": 6}), seen


def test_settings_that_would_train_wrongly_are_refused():
    cfg = RunConfig()
    check_training_settings(cfg)
    with pytest.raises(ValueError, match="train.grad_accum_steps must be >= 1, got 0"):
        check_training_settings(dataclasses.replace(cfg, train=TrainSection(grad_accum_steps=0)))
    with pytest.raises(ValueError, match="model.dtype=bfloat16.*model.compute_dtype=bfloat16"):
        check_training_settings(dataclasses.replace(cfg, model=ModelSection(dtype="bfloat16")))


def test_token_rows_learn_at_the_multiplied_rate_and_nothing_else_changes():
    """With optim.token_lr_multiplier, the chosen vocabulary rows of the embedding and of the untied
    output head take `factor` times the update of a run without it; every other value of every
    parameter takes the same update. Checked against AdamW's own first step: with Adam's bias
    correction the first update of a weight with gradient g is -lr * (g / (|g| + eps) + wd * p)."""
    _, params = nnx.split(init_model(CFG))
    rows, factor = (3, 61), 30.0
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    plain = OptimSection(lr=1e-3, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
    boosted = dataclasses.replace(plain, token_lr_multiplier=factor)
    lr = float(learning_rate_schedule(plain, 10)(0))
    expected_plain = -lr * 0.5 / (0.5 + plain.eps)
    updates = {}
    for name, optim in (("plain", plain), ("boosted", boosted)):
        optimizer = make_optimizer(optim, max_steps=10, token_rows=rows)
        update, _ = optimizer.update(grads, init_state(params, optimizer).opt_state, params)
        updates[name] = {
            jax.tree_util.keystr(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(update)
        }
    scaled = 0
    for key, plain_update in updates["plain"].items():
        np.testing.assert_allclose(plain_update, expected_plain, rtol=1e-6, err_msg=key)
        boosted_update = updates["boosted"][key]
        if key.startswith(("['embed']", "['lm_head']")):
            axis = 0 if key.startswith("['embed']") else 1
            want = np.full_like(plain_update, expected_plain)
            np.moveaxis(want, axis, 0)[list(rows)] *= factor
            np.testing.assert_allclose(boosted_update, want, rtol=1e-6, err_msg=key)
            scaled += 1
        else:
            np.testing.assert_array_equal(boosted_update, plain_update, err_msg=key)
    assert scaled == 2


def test_token_rows_settings_are_checked():
    cfg = RunConfig()
    with pytest.raises(ValueError, match="optim.token_lr_multiplier must be > 0"):
        check_training_settings(dataclasses.replace(cfg, optim=OptimSection(token_lr_multiplier=0.0)))
    lora = dataclasses.replace(cfg, optim=OptimSection(token_lr_multiplier=10.0), lora=LoraSection(rank=4))
    with pytest.raises(ValueError, match="a LoRA run trains the added tokens' rows with its adapters"):
        check_training_settings(lora)
    tokenizer = types.SimpleNamespace(
        get_vocab=lambda: {"<TIME-I>": 7, "a": 1},
        convert_tokens_to_ids=lambda ts: [{"<TIME-I>": 7}[t] for t in ts],
    )
    boosted = dataclasses.replace(
        cfg, optim=OptimSection(token_lr_multiplier=10.0, token_lr_tokens=("<TIME-I>",))
    )
    assert lr_token_rows(boosted, tokenizer) == (7,)
    assert lr_token_rows(cfg, tokenizer) == ()
    with pytest.raises(ValueError, match=r"\['<TIME-II>'\] are not tokens of the model's tokenizer"):
        lr_token_rows(
            dataclasses.replace(
                boosted, optim=OptimSection(token_lr_multiplier=10.0, token_lr_tokens=("<TIME-II>",))
            ),
            tokenizer,
        )
    with pytest.raises(ValueError, match="names no rows"):
        lr_token_rows(dataclasses.replace(cfg, optim=OptimSection(token_lr_multiplier=10.0)), tokenizer)
