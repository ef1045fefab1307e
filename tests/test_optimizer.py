"""The optimizer users expect: weight decay on the matrices and embeddings, not on norm weights or
biases (as Hugging Face and TRL train), unless asked; settings that would train wrongly refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import init_model
from persllm_jax.train.config import ModelSection, OptimSection, RunConfig, TrainSection
from persllm_jax.train.loop import check_training_settings
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
