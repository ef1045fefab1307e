"""How the next token is chosen: the per-row sampling settings, their named defaults, and the
jitted sampler (repetition penalty, temperature, top-k and top-p, seeded draws).

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


# How many of a row's most likely tokens the filters look at first: top-k up to this k, and top-p
# when these tokens hold the mass (a row that needs more falls back to bisection over the whole
# vocabulary). Selecting 256 costs about as much as two passes over the vocabulary on CPU.
TOP_CANDIDATES = 256
# The inverse-CDF draw sums the vocabulary in chunks of this many tokens, picks a chunk, then a
# token within it: two short cumulative sums instead of a random number per vocabulary entry.
_DRAW_CHUNK = 256


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


def _thresholds_by_bisection(scaled_BV, k_B, top_p_B):
    """(the k-th largest value, the top-p threshold) per row, each by bisection over the whole
    vocabulary: the path for rows whose answer lies beyond the top candidates."""
    kth_B = largest_passing(scaled_BV, lambda t: (scaled_BV >= t[:, None]).sum(-1) >= k_B)
    scaled_BV = jnp.where(scaled_BV >= kth_B[:, None], scaled_BV, -jnp.inf)
    probs = jax.nn.softmax(scaled_BV, axis=-1)

    def mass_reaches_p(t):
        return jnp.where(scaled_BV >= t[:, None], probs, 0.0).sum(-1) >= top_p_B * (1 - 1e-6)

    return kth_B, largest_passing(scaled_BV, mass_reaches_p)


def filter_top_k_top_p(scaled_BV, top_k_B, top_p_B, candidates: int = TOP_CANDIDATES):
    """-inf outside each row's top-k, then outside the smallest set of most likely tokens whose
    probability reaches top-p (ties at the boundary are kept).

    Both thresholds are read off the row's `candidates` largest values, sorted: the k-th of them,
    and the first at which their cumulative probability (normalised over the whole vocabulary)
    reaches p. A row whose k exceeds the candidates (short of the whole vocabulary), or whose
    candidates hold less than p, sends the call to bisection over the vocabulary instead."""
    vocab = scaled_BV.shape[-1]
    top_p_B = jnp.minimum(top_p_B, 1.0)
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    m = min(candidates, vocab)
    top_BM = jax.lax.top_k(scaled_BV, m)[0]
    kth_B = jnp.where(
        k_B <= m, jnp.take_along_axis(top_BM, jnp.clip(k_B - 1, 0, m - 1)[:, None], 1)[:, 0], -jnp.inf
    )
    kept_BV = jnp.where(scaled_BV >= kth_B[:, None], scaled_BV, -jnp.inf)
    top_BM = jnp.where(top_BM >= kth_B[:, None], top_BM, -jnp.inf)
    mass_BM = jnp.cumsum(jnp.exp(top_BM - jax.nn.logsumexp(kept_BV, axis=-1, keepdims=True)), axis=-1)
    reaches_BM = mass_BM >= (top_p_B * (1 - 1e-6))[:, None]
    first_B = jnp.argmax(reaches_BM, axis=-1)
    p_threshold_B = jnp.take_along_axis(top_BM, first_B[:, None], 1)[:, 0]
    beyond = ((k_B > m) & (k_B < vocab)) | ((top_p_B < 1.0) & ~reaches_BM[:, -1])
    kth_B, p_threshold_B = jax.lax.cond(
        jnp.any(beyond),
        lambda: _thresholds_by_bisection(scaled_BV, k_B, top_p_B),
        lambda: (kth_B, p_threshold_B),
    )
    keep = (scaled_BV >= kth_B[:, None]) & ((scaled_BV >= p_threshold_B[:, None]) | (top_p_B[:, None] >= 1.0))
    return jnp.where(keep, scaled_BV, -jnp.inf)


def draw(key, scaled_V):
    """One token drawn with probability softmax(scaled_V) (-inf: never), by inverting the
    cumulative distribution at one uniform number: first over chunk sums, then within the chunk.
    A Gumbel draw would need a random number per vocabulary entry, on CPU about 20 times the cost
    of the whole draw here at a 49k vocabulary and 16 rows."""
    weights = jnp.exp(scaled_V - jnp.max(scaled_V))
    chunks = -(-weights.shape[0] // _DRAW_CHUNK)
    weights_CK = jnp.pad(weights, (0, chunks * _DRAW_CHUNK - weights.shape[0])).reshape(chunks, _DRAW_CHUNK)
    sums_C = weights_CK.sum(-1)
    through_C = jnp.cumsum(sums_C)
    u = jax.random.uniform(key, dtype=through_C.dtype) * through_C[-1]
    # the first chunk whose running sum passes u; rounding can leave u at the total (or, within
    # the chunk, just below 0), so the pick is kept to the span of entries with weight
    last_C = jnp.max(jnp.where(sums_C > 0, jnp.arange(chunks), 0))
    c = jnp.minimum((through_C <= u).sum(), last_C)
    u = u - jnp.where(c > 0, through_C[jnp.maximum(c - 1, 0)], 0.0)
    within_K = weights_CK[c]
    has_weight_K = within_K > 0
    first_K = jnp.argmax(has_weight_K)
    last_K = _DRAW_CHUNK - 1 - jnp.argmax(has_weight_K[::-1])
    j = jnp.clip((jnp.cumsum(within_K) <= u).sum(), first_K, last_K)
    return (c * _DRAW_CHUNK + j).astype(jnp.int32)


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
    sampled_B = jax.vmap(draw)(keys, scaled)
    return jnp.where(temperature > 0, sampled_B, greedy_B)
