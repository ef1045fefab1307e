"""How the next token is chosen: the per-row sampling settings, their named defaults, and the
jitted sampler (repetition penalty, temperature, top-k and top-p by bisection, seeded draws).

Every default set of sampling settings in the project is defined here: the API's (greedy), the
one persona answers are sampled with (chat, talk and evaluation), and what the OpenAI protocol
assumes when a request leaves a setting out (the server).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one row. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


GREEDY = SamplingParams()

# Persona answers (chat, talk, evaluation) are sampled: distinction BLEU compares two samples of
# one question, and a 135M-parameter model repeats itself under greedy decoding.
PERSONA_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1)

# What an OpenAI chat-completions request means when it leaves a setting out.
OPENAI_TEMPERATURE = 1.0
OPENAI_TOP_P = 1.0


def penalize(logits_BV, seen_BV, penalty_B):
    # transformers' rule: a seen token's positive logit is divided by the penalty, a negative one multiplied.
    penalty = penalty_B[:, None]
    penalized = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalized, logits_BV)


def largest_passing(scaled_BV, passes, iterations: int = 48):
    """Per row, the largest value t (to float precision) with passes(t) true, by bisection.

    `passes` must be monotone (true for small t). Bisection costs a few passes over the vocabulary
    instead of sorting it, which on CPU is the difference between ~10 ms and ~100 ms a step."""
    lo = jnp.min(jnp.where(jnp.isfinite(scaled_BV), scaled_BV, jnp.inf), axis=-1)  # skip -inf (filtered)
    hi = jnp.max(scaled_BV, axis=-1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) / 2
        ok = passes(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
    return jnp.where(passes(hi), hi, lo)


def filter_top_k_top_p(scaled_BV, top_k_B, top_p_B):
    """-inf outside each row's top-k, then outside the smallest set of most likely tokens whose
    probability reaches top-p (ties at the boundary are kept)."""
    vocab = scaled_BV.shape[-1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth_B = largest_passing(scaled_BV, lambda t: (scaled_BV >= t[:, None]).sum(-1) >= k_B)
    scaled_BV = jnp.where(scaled_BV >= kth_B[:, None], scaled_BV, -jnp.inf)
    probs = jax.nn.softmax(scaled_BV, axis=-1)
    top_p_B = jnp.minimum(top_p_B, 1.0)

    def mass_reaches_p(t):
        return jnp.where(scaled_BV >= t[:, None], probs, 0.0).sum(-1) >= top_p_B * (1 - 1e-6)

    p_threshold_B = largest_passing(scaled_BV, mass_reaches_p)
    keep = (scaled_BV >= p_threshold_B[:, None]) | (top_p_B[:, None] >= 1.0)
    return jnp.where(keep, scaled_BV, -jnp.inf)


def sample(logits_BV, seen_BV, rows, step, greedy_only: bool):
    """Next token per row. `rows` holds per-row temperature, top_k, top_p, penalty and seed; the
    random key of a row depends only on its seed and `step` (tokens it has generated so far, one
    for all rows or one per row), so a sample does not change with what else is in the batch."""
    logits_BV = penalize(logits_BV, seen_BV, rows["penalty"])
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if greedy_only:
        return greedy_B
    temperature = rows["temperature"]
    scaled = logits_BV / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    needs_filter = jnp.any(rows["top_k"] > 0) | jnp.any(rows["top_p"] < 1.0)
    scaled = jax.lax.cond(
        needs_filter, lambda x: filter_top_k_top_p(x, rows["top_k"], rows["top_p"]), lambda x: x, scaled
    )
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), rows["seed"].shape)
    keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(rows["seed"], steps)
    sampled_B = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_B, greedy_B)
