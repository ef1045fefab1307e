"""Attention of a call's new tokens over a row's cached pages and over each other, tile by tile.

The queries of a prefill chunk are cut into blocks of `QUERY_BLOCK` tokens; each reads the row's
cached keys `PAGES_PER_TILE` pages at a time, straight from the pool through the page table, then
this call's own keys block by block up to its own (causal: later blocks are skipped, not masked),
with the softmax kept online (a running maximum and sum per query). Nothing of size [T, S] is ever
held, and each tile of scores fits in the CPU's caches: on CPU a dense product over a 512-token
chunk and 512 cached tokens spent most of its time writing and re-reading its score and
gathered-key arrays (benchmarks/generate_throughput.py measures the prefill rate).

A key is seen by a query when it is the row's (cached before the call, or one of this call's real
tokens at or before the query's position) and, in a sliding-window layer, fewer than `window`
positions behind it. A query always sees its own key, so a filler row of padding stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUERY_BLOCK = 128  # query and new-key block of a prefill chunk
PAGES_PER_TILE = 4  # cached pages read per tile (64 tokens with 16-token pages)
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked tile gives no NaN
_F32 = jnp.float32


def tiled(t: int, cached_pages: int) -> bool:
    """Whether a call of `t` new tokens per row runs tiled (prefill chunks) rather than dense."""
    return t % QUERY_BLOCK == 0 and cached_pages % PAGES_PER_TILE == 0


def attend_tiled(q_BTNH, k_BTKH, v_BTKH, positions_BT, valid_BT, k_pool, v_pool, cached, window, scale):
    """Attention output [B, T, N, H] of a chunk's queries.

    `k_pool`, `v_pool`: one layer's pages [pages, K, page, H]; `cached`: (table_BN, first_B,
    start_B): each row's pages to read, the position of the first key in its first page, and
    its number of cached positions (keys at or past it in the pages are stale or someone else's);
    `window`: a sliding-window layer's window (traced) or None."""
    b, t, n, h = q_BTNH.shape
    kv = k_BTKH.shape[2]
    g = n // kv
    table_BN, first_B, start_B = cached
    page = k_pool.shape[2]
    tile = PAGES_PER_TILE * page
    q_BKGTH = q_BTNH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)

    def visible(q_pos_BQ, k_pos_BS, allowed_BQS):
        if window is None:
            return allowed_BQS
        return allowed_BQS & (q_pos_BQ[:, :, None] - k_pos_BS[:, None, :] < window)

    def add_tile(state, q_i, k_BKSH, v_BKSH, seen_BQS):
        top, total, acc = state
        s = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_BKSH, preferred_element_type=_F32) * scale
        seen = seen_BQS[:, None, None]
        s = jnp.where(seen, s, _NEG)
        top_new = jnp.maximum(top, s.max(-1))
        p = jnp.where(seen, jnp.exp(s - top_new[..., None]), 0.0)
        alpha = jnp.exp(top - top_new)
        pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=_F32)
        return top_new, alpha * total + p.sum(-1), alpha[..., None] * acc + pv

    def query_block(i, out):
        q_i = jax.lax.dynamic_slice_in_dim(q_BKGTH, i * QUERY_BLOCK, QUERY_BLOCK, axis=3)
        q_pos = jax.lax.dynamic_slice_in_dim(positions_BT, i * QUERY_BLOCK, QUERY_BLOCK, axis=1)

        def cached_tile(c, state):
            pages_BP = jax.lax.dynamic_slice_in_dim(table_BN, c * PAGES_PER_TILE, PAGES_PER_TILE, axis=1)
            # [B, pages, K, page, H] -> [B, K, tile, H]
            k_BKSH = k_pool[pages_BP].transpose(0, 2, 1, 3, 4).reshape(b, kv, tile, h)
            v_BKSH = v_pool[pages_BP].transpose(0, 2, 1, 3, 4).reshape(b, kv, tile, h)
            k_pos = first_B[:, None] + c * tile + jnp.arange(tile, dtype=jnp.int32)[None]
            seen = visible(
                q_pos, k_pos, jnp.broadcast_to((k_pos < start_B[:, None])[:, None, :], (b, QUERY_BLOCK, tile))
            )
            return add_tile(state, q_i, k_BKSH, v_BKSH, seen)

        def new_tile(j, state):
            k_j = jax.lax.dynamic_slice_in_dim(k_BKTH, j * QUERY_BLOCK, QUERY_BLOCK, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v_BKTH, j * QUERY_BLOCK, QUERY_BLOCK, axis=2)
            k_pos = jax.lax.dynamic_slice_in_dim(positions_BT, j * QUERY_BLOCK, QUERY_BLOCK, axis=1)
            k_valid = jax.lax.dynamic_slice_in_dim(valid_BT, j * QUERY_BLOCK, QUERY_BLOCK, axis=1)
            behind = q_pos[:, :, None] - k_pos[:, None, :]
            itself = (jnp.arange(QUERY_BLOCK)[:, None] == jnp.arange(QUERY_BLOCK)[None, :]) & (i == j)
            seen = visible(q_pos, k_pos, ((behind >= 0) & k_valid[:, None, :]) | itself[None])
            return add_tile(state, q_i, k_j, v_j, seen)

        state = (
            jnp.full((b, kv, g, QUERY_BLOCK), _NEG, _F32),
            jnp.zeros((b, kv, g, QUERY_BLOCK), _F32),
            jnp.zeros((b, kv, g, QUERY_BLOCK, h), _F32),
        )
        if table_BN.shape[1]:  # (no pages: nothing cached before a prompt's first chunk)
            state = jax.lax.fori_loop(0, table_BN.shape[1] // PAGES_PER_TILE, cached_tile, state)
        _, total, acc = jax.lax.fori_loop(0, i + 1, new_tile, state)
        out_i = (acc / total[..., None]).astype(out.dtype)  # total >= 1: a query sees its own key
        return jax.lax.dynamic_update_slice_in_dim(out, out_i, i * QUERY_BLOCK, axis=3)

    out = jax.lax.fori_loop(0, t // QUERY_BLOCK, query_block, jnp.zeros(q_BKGTH.shape, q_BTNH.dtype))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
