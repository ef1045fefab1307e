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

from persllm_jax.model.attention import attend
from persllm_jax.model.decoder import _layer_rotary_and_window, _local_layers, _rotary_tables

SCRATCH_PAGE = 0


def empty_pool(cfg, num_pages: int, page_size: int):
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)


def pool_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def paged_hidden_states(model, ids_BT, positions_BT, valid_BT, pool, pages_BN):
    """Final-normed hidden states [B, T, D] of T new tokens per row, and the pool with their keys
    and values written.

    `positions_BT`: each new token's position in its row (consecutive, after the row's cached
    tokens); `valid_BT`: false for padding (written to the scratch page; its position should be a
    real one of the row, so that its query sees at least one key); `pages_BN`: each row's page
    table, padded with the scratch page. A query sees the keys of its own row at positions up to
    its own (and, in a sliding-window layer, within the window)."""
    cfg = model.cfg
    k_pool, v_pool = pool
    page_size = k_pool.shape[2]
    b, n = pages_BN.shape
    page_of_BT = jnp.take_along_axis(pages_BN, positions_BT // page_size, axis=1)
    page_of_BT = jnp.where(valid_BT, page_of_BT, SCRATCH_PAGE)
    offset_BT = positions_BT % page_size
    key_positions_S = jnp.arange(n * page_size, dtype=jnp.int32)
    behind_BTS = positions_BT[:, :, None] - key_positions_S[None, None, :]
    causal_BTS = behind_BTS >= 0
    rotary = _rotary_tables(cfg, positions_BT)
    x_BTD = model._embed(ids_BT)
    graphdef, stacked_state = nnx.split(model.layers)
    scale = cfg.attention_scale

    def one_layer(carry, layer_inputs):
        x, k_all, v_all = carry
        layer_state, local, index = layer_inputs
        layer = nnx.merge(graphdef, layer_state)
        cos, sin, window = _layer_rotary_and_window(cfg, rotary, local)

        def paged(q, k, v):
            k_new = k_all.at[index, page_of_BT, offset_BT].set(k.astype(k_all.dtype))
            v_new = v_all.at[index, page_of_BT, offset_BT].set(v.astype(v_all.dtype))
            keys = k_new[index, pages_BN].reshape(b, n * page_size, *k_new.shape[3:])
            values = v_new[index, pages_BN].reshape(b, n * page_size, *v_new.shape[3:])
            mask = causal_BTS if window is None else causal_BTS & (behind_BTS < window)
            return attend(q, keys, values, mask, "xla", scale=scale), (k_new, v_new)

        x, (k_all, v_all) = layer(x, cos, sin, None, paged)
        return (x, k_all, v_all), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    xs = (stacked_state, _local_layers(cfg), layer_ids)
    (x_BTD, k_pool, v_pool), _ = jax.lax.scan(one_layer, (x_BTD, k_pool, v_pool), xs)
    return model.final_norm(x_BTD), (k_pool, v_pool)
