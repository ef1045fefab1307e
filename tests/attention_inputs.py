"""Inputs for the attention-kernel tests: random queries, keys and values, packed segment ids, and the
mask they mean, built here in numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from persllm_jax.model.sharding import logical_to_spec


def inputs(b, t, n, k, h, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, key, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), dtype) for heads in (n, k, k))
    return q, key, v


def packed_segments(b, t, seed=0, most=4):
    """Packed rows: 1 to `most` segments (ids 1, 2, ...) then right padding (id 0)."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((b, t), np.int32)
    for row in range(b):
        used = rng.integers(t // 2, t + 1)
        cuts = np.sort(rng.choice(np.arange(1, used), size=rng.integers(0, most), replace=False))
        for index, (start, stop) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
            segments[row, start:stop] = index
    return segments


def reference_mask(segments, window=None):
    """Token t sees token s when s <= t and both are in the same non-padding segment (and, with a
    window, t - s < window)."""
    t = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    behind = np.arange(t)[:, None] - np.arange(t)[None, :]
    near = (behind >= 0) & (behind < (window or t + 1))
    return same & near[None] & (segments[:, None, :] > 0)


def placed_like_activations(x, mesh):
    axes = ("batch", "length", "act_heads", None)
    return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh))
