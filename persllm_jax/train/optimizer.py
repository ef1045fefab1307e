"""AdamW with linear warmup, cosine decay to a floor, and global-norm clipping; weight decay on
the matrices only unless asked otherwise; optionally a larger learning rate for a few vocabulary
rows (the stage tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from persllm_jax.train.config import OptimSection


def learning_rate_schedule(cfg: OptimSection, max_steps: int) -> optax.Schedule:
    """0 -> lr over `warmup_steps`, then cosine down to lr * min_lr_ratio at `max_steps`."""
    warmup = min(cfg.warmup_steps, max(max_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(max_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params: nnx.State) -> nnx.State:
    """True for the parameters weight decay applies to: not norm weights (logical axis `norm`) and
    not biases. Decaying a norm's gain pulls it toward zero, which no pretrained model expects."""

    def decays(path, variable) -> nnx.Variable:
        name = getattr(path[-1], "key", None) if path else None
        axes = variable.get_metadata().get("logical_axes", ()) if hasattr(variable, "get_metadata") else ()
        return variable.replace(name != "bias" and "norm" not in axes)

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def scale_token_rows(rows: tuple[int, ...], factor: float) -> optax.GradientTransformation:
    """Multiplies the update of the given vocabulary rows (of every parameter with a `vocab` axis:
    the input embedding, and the output head when it is untied) by `factor`: their learning rate
    times `factor`, the other rows unchanged. After AdamW, whose update size does not follow the
    gradient's, this is what changes how far those rows move."""
    if not rows or factor == 1.0:
        return optax.identity()
    index = jnp.asarray(rows, jnp.int32)

    def scale(path, update):
        variable = update if isinstance(update, nnx.Variable) else None
        axes = variable.get_metadata().get("logical_axes", ()) if variable is not None else ()
        if "vocab" not in axes:
            return update
        value = variable.get_value()
        axis = axes.index("vocab")
        moved = jnp.moveaxis(value, axis, 0)
        moved = moved.at[index].multiply(jnp.asarray(factor, value.dtype))
        return variable.replace(jnp.moveaxis(moved, 0, axis))

    def update_fn(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            scale, updates, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(
    cfg: OptimSection, max_steps: int, token_rows: tuple[int, ...] = ()
) -> optax.GradientTransformation:
    """`token_rows`: the vocabulary rows `cfg.token_lr_multiplier` applies to."""
    schedule = learning_rate_schedule(cfg, max_steps)
    mask = None if cfg.decay_norms_and_biases else decay_mask
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask),
        scale_token_rows(tuple(token_rows), cfg.token_lr_multiplier),
    )
