"""AdamW with linear warmup, cosine decay to a floor, and global-norm clipping."""

from __future__ import annotations

import optax

from persllm_jax.run_config import OptimSection


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


def make_optimizer(cfg: OptimSection, max_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, max_steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
