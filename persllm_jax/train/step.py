"""One pure train step shared by SFT and DPO: they differ only in the batch and the loss.

A loss function returns (loss_sum, count, sums): the summed loss over the batch, what it is a
sum over (tokens for SFT, pairs for DPO) and a dict of summed metrics. The step sums these over
gradient-accumulation micro-batches and divides once at the end, so accumulation gives the same
update as one large batch (DPO's `dpo.sft_weight` term apart: a token mean per micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from persllm_jax.train.state import TrainState, trained

LossFn = Callable[[nnx.Module, Any, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def _micro_batches(batch, num: int):
    """[B, ...] -> [num, B / num, ...], taking every num-th row so each device keeps its rows."""

    def split(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    grad_shardings=None,
    trainable=nnx.Param,
    dropout_seed: int | None = None,
):
    """The step function (state, batch, frozen) -> (state, metrics); jit it with shardings.

    With `dropout_seed`, the loss function is also given `dropout_key`, drawn from the seed, the
    step number and the micro-batch: the same masks on every host and in a resumed run.

    Only the parameters of kind `trainable` (every `nnx.Param`, or the LoRA adapters) get
    gradients and updates; the others pass through the step unchanged, bit for bit.
    `grad_shardings` (the parameters' shardings) constrains the gradients: each device then keeps
    only its shard of them (a reduce-scatter instead of an all-reduce under fsdp), and the
    optimizer update runs on shards."""

    def summed_loss(train, fixed, batch, frozen, key):
        extra = {} if key is None else {"dropout_key": key}
        loss_sum, count, sums = loss_fn(nnx.merge(graphdef, train, fixed), batch, frozen, **extra)
        return loss_sum, (count, sums)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    if grad_shardings is not None:
        grad_shardings = trained(grad_shardings, trainable)

    def step(state: TrainState, batch, frozen=None):
        train, fixed = nnx.split_state(state.params, trainable, ...)
        keys = None
        if dropout_seed is not None:
            step_key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
            keys = jax.random.split(step_key, grad_accum_steps)
        if grad_accum_steps == 1:
            key = None if keys is None else keys[0]
            (loss_sum, (count, sums)), grads = grad_fn(train, fixed, batch, frozen, key)
        else:
            micro = _micro_batches(batch, grad_accum_steps)

            def accumulate(carry, inputs):
                one, key = inputs
                (loss_sum, (count, sums)), grads = grad_fn(train, fixed, one, frozen, key)
                return jax.tree.map(jnp.add, carry, (loss_sum, count, sums, grads)), None

            first = None if keys is None else keys[0]
            (loss_sum, (count, sums)), grads = grad_fn(
                train, fixed, jax.tree.map(lambda x: x[0], micro), frozen, first
            )
            rest = jax.tree.map(lambda x: x[1:], micro)
            rest_keys = None if keys is None else keys[1:]
            (loss_sum, count, sums, grads), _ = jax.lax.scan(
                accumulate, (loss_sum, count, sums, grads), (rest, rest_keys)
            )
        denominator = jnp.maximum(count.astype(jnp.float32), 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        updates, opt_state = optimizer.update(grads, state.opt_state, train)
        params = nnx.merge_state(optax.apply_updates(train, updates), fixed)
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            "count": count,
            **sums,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step
