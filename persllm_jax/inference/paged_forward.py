"""The model's forward pass over a paged KV cache, for the continuous-batching generator.

The cache is a pool of fixed-size pages, (k, v) each [layers, pages, page_size, kv_heads,
head_dim]. A row owns a list of pages (its page table); the token at position p lives in page
`table[p // page_size]` at offset `p % page_size`. Rows of one call may be at any positions: each
writes its new tokens into its own pages and attends over the pages in its table, so a row joining
mid-stream, a row prefilling a chunk of its prompt and a row decoding its 200th token run in the
same shapes. Attention reads only the pages a call passes (the caller passes as many as its
longest row has written, rounded to a few sizes), not a whole preallocated cache.

Page 0 is the scratch page: padding tokens write there and no row's real keys live there, so
whatever it holds is masked out (it is never read unmasked, and always finite).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persllm_jax.model.decoder import _layer_rotary_and_window, _local_layers, _rotary_tables

SCRATCH_PAGE = 0
_MASKED = -1e30  # a masked score: exp() of it minus any real score is 0


def empty_pool(cfg, num_pages: int, page_size: int):
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)


def pool_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def paged_hidden_states(model, ids_BT, positions_BT, valid_BT, pool, pages_BN):
    """Final-normed hidden states [B, T, D] of T new tokens per row, and their keys and values
    (k, v), each [layers, B, T, kv_heads, head_dim], for `write_pages` to store.

    `positions_BT`: each new token's position in its row, consecutive from the number of tokens
    the row has cached; `valid_BT`: false for padding (its position should repeat the row's last
    real one); `pages_BN`: each row's page table, padded with the scratch page. A query sees the
    row's cached keys and this call's real keys up to its own position (and, in a sliding-window
    layer, within the window). The pool is only read here: a call that passed it through to its
    outputs (donated) runs markedly slower on CPU than one that reads it and leaves the writing
    to a separate small call."""
    cfg = model.cfg
    k_pool, v_pool = pool
    page_size = k_pool.shape[2]
    b, n = pages_BN.shape
    t = ids_BT.shape[1]
    cached_positions_S = jnp.arange(n * page_size, dtype=jnp.int32)
    behind_cached_BTS = positions_BT[:, :, None] - cached_positions_S[None, None, :]
    before_call_B1S = cached_positions_S[None, None, :] < positions_BT[:, :1, None]
    cached_BTS = jnp.broadcast_to(before_call_B1S, (b, t, n * page_size))
    behind_new_BTT = positions_BT[:, :, None] - positions_BT[:, None, :]
    # its own key always: a filler row of padding alone still attends to something finite
    new_BTT = ((behind_new_BTT >= 0) & valid_BT[:, None, :]) | jnp.eye(t, dtype=bool)[None]
    rotary = _rotary_tables(cfg, positions_BT)
    x_BTD = model._embed(ids_BT)
    graphdef, stacked_state = nnx.split(model.layers)
    scale = cfg.attention_scale

    def one_layer(x, layer_inputs):
        layer_state, local, k_layer, v_layer = layer_inputs
        layer = nnx.merge(graphdef, layer_state)
        cos, sin, window = _layer_rotary_and_window(cfg, rotary, local)

        def paged(q, k, v):
            k, v = k.astype(k_layer.dtype), v.astype(v_layer.dtype)
            seen_cached, seen_new = cached_BTS, new_BTT
            if window is not None:
                seen_cached = seen_cached & (behind_cached_BTS < window)
                seen_new = seen_new & (behind_new_BTT < window)
            # the cached pages and this call's keys as two blocks of one softmax (no concatenated copy)
            parts = [
                _scores(
                    q, k_layer[pages_BN].reshape(b, n * page_size, *k_layer.shape[2:]), seen_cached, scale
                ),
                _scores(q, k, seen_new, scale),
            ]
            top = jnp.maximum(parts[0].max(-1, keepdims=True), parts[1].max(-1, keepdims=True))
            weights = [jnp.exp(part - top) for part in parts]
            total = weights[0].sum(-1, keepdims=True) + weights[1].sum(-1, keepdims=True)
            cached_v = v_layer[pages_BN].reshape(b, n * page_size, *v_layer.shape[2:])
            out = _weighted(weights[0] / total, cached_v) + _weighted(weights[1] / total, v)
            return out.reshape(q.shape).astype(q.dtype), (k, v)

        return layer(x, cos, sin, None, paged)

    xs = (stacked_state, _local_layers(cfg), k_pool, v_pool)
    x_BTD, new_kv = jax.lax.scan(one_layer, x_BTD, xs)
    return model.final_norm(x_BTD), new_kv


def _scores(q_BTNH, k_BSKH, mask_BTS, scale):
    """Grouped-query scores [B, K, G, T, S] in float32, masked."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask_BTS[:, None, None], scores, _MASKED)


def _weighted(probs_BKGTS, v_BSKH):
    out = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)
    return out.astype(jnp.float32)


def write_pages(pool, new_kv, positions_BT, valid_BT, pages_BN):
    """The pool with a call's new keys and values [layers, B, T, K, H] stored at their rows'
    positions (padding goes to the scratch page)."""
    page_size = pool[0].shape[2]
    page_of_BT = jnp.take_along_axis(pages_BN, positions_BT // page_size, axis=1)
    page_of_BT = jnp.where(valid_BT, page_of_BT, SCRATCH_PAGE)
    offset_BT = positions_BT % page_size
    return tuple(p.at[:, page_of_BT, offset_BT].set(new) for p, new in zip(pool, new_kv))
