"""The tiled attention of prefill chunks over paged keys (inference/paged_attention.py) against
attention written out row by row in float64: each row's keys listed in position order (its cached
ones read from its pages by hand, then the chunk's), one softmax per query. Within 1e-5 (fp32
sums in another order)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax.inference.paged_attention import PAGES_PER_TILE, QUERY_BLOCK, attend_tiled

PAGE = 16
KV_HEADS, GROUP, HEAD_DIM = 2, 3, 8
SCALE = HEAD_DIM**-0.5


def _reference(q, k, v, positions, valid, k_pool, v_pool, table, firsts, starts, window):
    """out[b, t] = softmax over the row's visible keys, written out per query (float64). Table
    column c of a row holds its positions firsts[row] + 16 c ... (a sliding-window layer's view
    starts at the window's first block)."""
    b, t = positions.shape
    out = np.zeros(q.shape)
    for row in range(b):
        first, start = firsts[row], starts[row]
        cached_pos = np.arange(first, start)
        where = [(table[row, (p - first) // PAGE], (p - first) % PAGE) for p in cached_pos]
        # a page is [K, page, H]: each head's keys in position order
        cached_k = np.stack([k_pool[page, :, slot] for page, slot in where]) if len(where) else None
        cached_v = np.stack([v_pool[page, :, slot] for page, slot in where]) if len(where) else None
        for i in range(t):
            keys, values, key_pos = [], [], []
            if len(where):
                keys.append(cached_k), values.append(cached_v), key_pos.append(cached_pos)
            new = [
                j for j in range(t) if (valid[row, j] and positions[row, j] <= positions[row, i]) or j == i
            ]
            keys.append(k[row, new]), values.append(v[row, new]), key_pos.append(positions[row, new])
            keys, values, key_pos = (np.concatenate(x).astype(np.float64) for x in (keys, values, key_pos))
            seen = np.ones(len(key_pos), bool) if window is None else positions[row, i] - key_pos < window
            seen[len(key_pos) - len(new) :] |= np.asarray(new) == i  # a query always sees itself
            for head in range(KV_HEADS * GROUP):
                kv = head // GROUP
                scores = keys[:, kv] @ q[row, i, head].astype(np.float64) * SCALE
                weights = np.where(seen, np.exp(scores - scores[seen].max()), 0.0)
                out[row, i, head] = weights @ values[:, kv] / weights.sum()
    return out


@pytest.mark.parametrize("window", [None, 40])
def test_tiled_attention_over_pages_equals_attention_written_out(window):
    rng = np.random.default_rng(0)
    b, t, num_pages = 3, 2 * QUERY_BLOCK, 40
    n = 3 * PAGES_PER_TILE  # pages read: 192 positions, more than the longest row has cached
    starts = np.array([0, 37, 150])  # a first chunk, a short cached prefix, a long one
    lengths = np.array([t, 200, 131])  # real tokens in the chunk: the others are padding
    k_pool = rng.standard_normal((num_pages, KV_HEADS, PAGE, HEAD_DIM)).astype(np.float32)
    v_pool = rng.standard_normal((num_pages, KV_HEADS, PAGE, HEAD_DIM)).astype(np.float32)
    # a sliding-window layer reads from the window's first block on (the ring's view)
    firsts = np.zeros(b, np.int64) if window is None else np.maximum(starts - window, 0) // PAGE * PAGE
    table = np.zeros((b, n), np.int32)  # unheld pages: the scratch page 0, masked
    for row, (first, start) in enumerate(zip(firsts, starts)):
        held = -(-(start - first) // PAGE)
        table[row, :held] = rng.choice(np.arange(1, num_pages), held, replace=False)
    positions = starts[:, None] + np.minimum(np.arange(t)[None, :], lengths[:, None] - 1)
    valid = np.arange(t)[None, :] < lengths[:, None]
    q = rng.standard_normal((b, t, KV_HEADS * GROUP, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((b, t, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((b, t, KV_HEADS, HEAD_DIM)).astype(np.float32)

    ours = attend_tiled(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
        jnp.asarray(positions, jnp.int32), jnp.asarray(valid),
        jnp.asarray(k_pool), jnp.asarray(v_pool),
        (jnp.asarray(table), jnp.asarray(firsts, jnp.int32), jnp.asarray(starts, jnp.int32)),
        None if window is None else jnp.int32(window), SCALE,
    )  # fmt: skip
    expected = _reference(q, k, v, positions, valid, k_pool, v_pool, table, firsts, starts, window)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)
