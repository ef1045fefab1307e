"""The model's forward pass over a paged KV cache, for the continuous-batching generator.

The cache is a pool of fixed-size pages, (k, v) each [layers, pages, kv_heads, page_size,
head_dim]: within a page each head's keys are contiguous, so a decode step's attention reads a
row's pages head by head as they lie, with no copy into another order (on CPU, with the single
query contracted without its length-1 axis, about 40% less time on the cached keys than pages
[page, K, H] in isolation on a busy CPU, 1-2% of a whole decode step on an idle one:
benchmarks/results/cpu_generate_smollm2.md). A row owns a list of pages (its page table); the token at position p lives in page
`table[p // page_size]` at offset `p % page_size`. Rows of one call may be at any positions: each
writes its new tokens into its own pages and attends over the pages in its table, so a row joining
mid-stream, a row prefilling a chunk of its prompt and a row decoding its 200th token run in the
same shapes. Attention reads only the pages a call passes (the caller passes as many as its
longest row has written, rounded to a few sizes), not a whole preallocated cache.

Page 0 is the scratch page: padding tokens write there and no row's real keys live there, so
whatever it holds is masked out (it is never read unmasked, and always finite).

Sliding-window layers (Gemma 3's local layers, Mistral's) keep their keys and values in a pool of
their own, where each decode slot owns a fixed ring of pages: block b of a row's positions lives
in ring page b mod R, with R pages enough for the window or a prefill chunk, whichever is
longer. However long a reply grows, a local layer holds R pages per slot; the global layers'
pages grow with the reply as above. The ring is read and written by position, so a row's stale
blocks (the previous occupant's, or its own from before the window) are always masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax.inference.paged_attention import PAGES_PER_TILE, attend_tiled, tiled
from persllm_jax.model.decoder import _layer_rotary_and_window, _local_layers, _rotary_tables

SCRATCH_PAGE = 0
_MASKED = -1e30  # a masked score: exp() of it minus any real score is 0


def layer_kinds(cfg):
    """Indices of the global and of the sliding-window layers."""
    local = np.asarray(cfg.sliding_layers)
    return np.flatnonzero(~local), np.flatnonzero(local)


def ring_pages(cfg, page_size: int, prefill_chunk: int) -> int:
    """Pages of a slot's ring for the sliding-window layers (0 without them): enough for the
    window's blocks and a partial one (what a call reads), and for a prefill chunk's blocks and a
    partial one (what a call writes, each block to a page of its own)."""
    if not cfg.has_sliding_layers:
        return 0
    return max(-(-cfg.sliding_window // page_size), -(-prefill_chunk // page_size)) + 1


def empty_pool(cfg, num_pages: int, page_size: int, ring_pages_total: int = 0):
    """(k, v) of the global layers [global layers, pages, K, page, H]; with sliding-window layers
    also (k, v) of theirs [sliding layers, ring pages in all, K, page, H]."""
    global_layers, local_layers = layer_kinds(cfg)
    tail = (cfg.num_kv_heads, page_size, cfg.head_dim)
    shapes = [(len(global_layers), num_pages, *tail)] * 2
    if len(local_layers):
        shapes += [(len(local_layers), ring_pages_total, *tail)] * 2
    return tuple(jnp.zeros(shape, cfg.compute_dtype) for shape in shapes)


def pool_bytes_per_token(cfg) -> int:
    """Bytes a token takes in the global layers' pages."""
    global_layers = len(layer_kinds(cfg)[0])
    return 2 * global_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def paged_hidden_states(
    model, ids_BT, positions_BT, valid_BT, pool, pages_BN, ring_BR=None, layer_states=None
):
    """Final-normed hidden states [B, T, D] of T new tokens per row, and their keys and values
    (k, v), each [layers, B, T, kv_heads, head_dim], for `write_pages` to store.

    `positions_BT`: each new token's position in its row, consecutive from the number of tokens
    the row has cached; `valid_BT`: false for padding (its position should repeat the row's last
    real one); `pages_BN`: each row's page table as far as the call reads (the pages of the tokens
    cached before it; none when no row has any), padded with the scratch page; `ring_BR`: each
    row's ring of pages for the sliding-window layers (models that have them); `layer_states`:
    the layers' parameters one state per layer (`unstack_layers`), run one after another instead
    of scanned over the stacked ones (see `unstack_layers` for why). A query sees the
    row's cached keys and this call's real keys up to its own position (and, in a sliding-window
    layer, within the window). The pool is only read here: a call that passed it through to its
    outputs (donated) runs markedly slower on CPU than one that reads it and leaves the writing
    to a separate small call."""
    cfg = model.cfg
    page_size = pool[0].shape[3]
    b, n = pages_BN.shape
    t = ids_BT.shape[1]
    start_B = positions_BT[:, 0]
    behind_new_BTT = positions_BT[:, :, None] - positions_BT[:, None, :]
    # its own key always: a filler row of padding alone still attends to something finite
    new_BTT = ((behind_new_BTT >= 0) & valid_BT[:, None, :]) | jnp.eye(t, dtype=bool)[None]
    use_tiles = tiled(t, n)
    global_cached = _cached_view(jnp.zeros((b,), jnp.int32), pages_BN, start_B, positions_BT, page_size)
    local_cached = None
    if cfg.has_sliding_layers:
        first_B = jnp.maximum(start_B - cfg.sliding_window, 0) // page_size
        # the window's blocks and the partial one, in whole tiles (blocks past the row's cached
        # positions are masked)
        span = -(-(-(-cfg.sliding_window // page_size) + 1) // PAGES_PER_TILE) * PAGES_PER_TILE
        blocks_BM = first_B[:, None] + jnp.arange(span, dtype=jnp.int32)[None, :]
        ring_pages_BM = jnp.take_along_axis(ring_BR, blocks_BM % ring_BR.shape[1], axis=1)
        local_cached = _cached_view(first_B, ring_pages_BM, start_B, positions_BT, page_size)
    rotary = _rotary_tables(cfg, positions_BT)
    x_BTD = model._embed(ids_BT)
    graphdef, stacked_state = nnx.split(model.layers)
    scale = cfg.attention_scale
    global_ids, local_ids = layer_kinds(cfg)
    kind_index = np.zeros(cfg.num_layers, np.int32)
    kind_index[global_ids] = np.arange(len(global_ids))
    kind_index[local_ids] = np.arange(len(local_ids))

    def attend_cached(q, k, v, k_layer, v_layer, cached, window):
        table, first_B, behind_BTS, before_BTS = cached
        if use_tiles:
            view = (table, first_B * page_size, start_B)
            return attend_tiled(q, k, v, positions_BT, valid_BT, k_layer, v_layer, view, window, scale)
        seen_cached, seen_new = before_BTS, new_BTT
        if window is not None:
            seen_cached = seen_cached & (behind_BTS < window)
            seen_new = seen_new & (behind_new_BTT < window)
        parts = [(k.transpose(0, 2, 1, 3)[:, None], v.transpose(0, 2, 1, 3)[:, None], seen_new)]
        if table.shape[1]:  # (nothing is cached before a prompt's first chunk)
            parts.append((k_layer[table], v_layer[table], seen_cached))
        return _attend(q, parts, scale)

    def in_pool(k_pool, v_pool, index):
        return (
            jax.lax.dynamic_index_in_dim(k_pool, index, keepdims=False),
            jax.lax.dynamic_index_in_dim(v_pool, index, keepdims=False),
        )

    def run_layer(x, layer_state, cos, sin, window, read_cache):
        """One layer over its new tokens; `read_cache(q, k, v, window)` attends over the cache."""

        def paged(q, k, v):
            k, v = k.astype(pool[0].dtype), v.astype(pool[0].dtype)
            return read_cache(q, k, v, window), (k, v)

        return nnx.merge(graphdef, layer_state)(x, cos, sin, None, paged)

    def one_layer(x, layer_inputs):
        layer_state, local, index, *kv_layer = layer_inputs

        def read_cache(q, k, v, window):
            if local_cached is None:  # the layer's pages come with it through the scan
                return attend_cached(q, k, v, *kv_layer, global_cached, window)
            if not len(global_ids):
                return attend_cached(q, k, v, *in_pool(pool[2], pool[3], index), local_cached, window)
            return jax.lax.cond(
                local,
                lambda: attend_cached(q, k, v, *in_pool(pool[2], pool[3], index), local_cached, window),
                lambda: attend_cached(q, k, v, *in_pool(pool[0], pool[1], index), global_cached, window),
            )

        return run_layer(x, layer_state, *_layer_rotary_and_window(cfg, rotary, local), read_cache)

    if layer_states is not None:
        new_k, new_v = [], []
        for i, layer_state in enumerate(layer_states):
            local = bool(cfg.sliding_layers[i])
            k_pool, v_pool, cached = (
                (pool[2], pool[3], local_cached) if local else (pool[0], pool[1], global_cached)
            )

            def read_cache(
                q, k, v, window, k_layer=k_pool[kind_index[i]], v_layer=v_pool[kind_index[i]], cached=cached
            ):
                # A layer's cached pages depend on the page table alone, so XLA would gather every
                # layer's pages at the start of the call and read them back long after, out of
                # cache (a decode step at 16 rows: 126-136 ms against 99-100 ms; in a stand-in, an
                # optimization barrier did not keep the order). A page table that depends on each
                # row's query, and equals the table, makes each layer gather its pages when it runs.
                after_q_B = jnp.isnan(q[:, 0, 0, 0]).astype(jnp.int32)
                table = jnp.minimum(cached[0], cached[0] + after_q_B[:, None])
                return attend_cached(q, k, v, k_layer, v_layer, (table, *cached[1:]), window)

            rotary_and_window = _layer_rotary_and_window(cfg, rotary, local)
            x_BTD, (k, v) = run_layer(x_BTD, layer_state, *rotary_and_window, read_cache)
            new_k.append(k)
            new_v.append(v)
        return model.final_norm(x_BTD), (jnp.stack(new_k), jnp.stack(new_v))

    xs = (stacked_state, _local_layers(cfg), jnp.asarray(kind_index))
    if local_cached is None:
        xs = (*xs, pool[0], pool[1])
    x_BTD, new_kv = jax.lax.scan(one_layer, x_BTD, xs)
    return model.final_norm(x_BTD), new_kv


def unstack_layers(model):
    """The layers' parameters as one state per layer, for `paged_hidden_states` to run the layers
    one after another (a second copy of the layers' weights). A scan over the stacked parameters
    slices each layer's weights out of them at every step, and XLA on CPU copies the slice before
    its matmuls: SmolLM2-135M's decode call with nothing cached took 35-36 ms unrolled against
    50-54 ms scanned at 1 row, 58-61 against 63-65 at 8 and 71-74 against 77-79 at 16. Reading the
    cached keys costs the unrolled layers more, though: with the cache, a single stream's decode
    step took 37 ms against 49 ms, but the scanned one was as fast or faster at 4 to 16 rows
    (16 rows: 99-100 against 90-96 ms, both in one process), and an unrolled call takes about three
    times as long to compile (benchmarks/results/cpu_generate_smollm2.md)."""
    return _unstack(nnx.state(model.layers), model.cfg.num_layers)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(stacked, num_layers):
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)]


def _cached_view(first_block_B, table_BN, start_B, positions_BT, page_size):
    """(the pages to read, the block the first of them holds, how far behind each query each read
    key is, whether it was cached before this call): the pages hold blocks first_block,
    first_block + 1, ... of the row. A tiled call uses only the first two (the masks it builds
    tile by tile; XLA drops the unused ones)."""
    n = table_BN.shape[1]
    key_positions_BS = first_block_B[:, None] * page_size + jnp.arange(n * page_size, dtype=jnp.int32)[None]
    behind_BTS = positions_BT[:, :, None] - key_positions_BS[:, None, :]
    before_BTS = jnp.broadcast_to(
        (key_positions_BS < start_B[:, None])[:, None, :],
        (table_BN.shape[0], positions_BT.shape[1], n * page_size),
    )
    return table_BN, first_block_B, behind_BTS, before_BTS


def _attend(q_BTNH, parts, scale):
    """Grouped-query attention of q over several blocks of keys [(k_BPKLH, v_BPKLH, mask_BTS)],
    each in pages as the pool holds them (P pages of L positions, S = P * L, a page's positions in
    order), as one softmax, without concatenating them. The weights stay unnormalised until after
    the products with the values: on CPU each pass over the [T, S] scores costs more than the
    matmuls of a prefill chunk, so the scores are written once, exponentiated once, and never
    divided."""
    b, t, n, h = q_BTNH.shape
    kv = parts[0][0].shape[2]
    # A decode step's single query is contracted without its length-1 axis: with it, XLA on CPU
    # lays the products out another way and the step's cached-key reads took half again as long.
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    q_or_decode = q_BTKGH[:, 0] if t == 1 else q_BTKGH
    scores_spec, values_spec = (
        ("bkgh,bpklh->bkgpl", "bkgpl,bpklh->bkgh")
        if t == 1
        else ("btkgh,bpklh->bkgtpl", "bkgtpl,bpklh->btkgh")
    )

    def part_scores(k_BPKLH, mask_BTS):
        s = jnp.einsum(scores_spec, q_or_decode, k_BPKLH, preferred_element_type=jnp.float32)
        s = s.reshape(b, kv, n // kv, t, -1)
        return jnp.where(mask_BTS[:, None, None], s * scale, _MASKED)

    scores = [part_scores(k_BPKLH, mask_BTS) for k_BPKLH, _, mask_BTS in parts]
    top = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - top) for s in scores]
    total_BKGT = sum(w.sum(-1) for w in weights)

    def part_values(w_BKGTS, v_BPKLH):
        w = w_BKGTS[:, :, :, 0] if t == 1 else w_BKGTS
        w = w.reshape(*w.shape[:-1], v_BPKLH.shape[1], v_BPKLH.shape[3]).astype(v_BPKLH.dtype)
        out = jnp.einsum(values_spec, w, v_BPKLH, preferred_element_type=jnp.float32)
        return out[:, None] if t == 1 else out

    out_BTKGH = sum(part_values(w, v_BPKLH) for w, (_, v_BPKLH, _) in zip(weights, parts))
    out_BTKGH = out_BTKGH / total_BKGT.transpose(0, 3, 1, 2)[..., None]
    return out_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype)


def write_pages(pool, new_kv, positions_BT, valid_BT, pages_BW, ring_BR=None, layers=None):
    """The pool with a call's new keys and values [layers, B, T, K, H] stored at their rows'
    positions (padding goes to the scratch page): the global layers' in the rows' pages
    (`pages_BW`: each row's pages from the block of its first position on, as far as the call
    writes), the
    sliding-window layers' in their rings. `layers`: (global, sliding) layer indices."""
    page_size = pool[0].shape[3]
    block_BT = positions_BT // page_size
    offset_BT = positions_BT % page_size
    within_BT = jnp.clip(block_BT - block_BT[:, :1], 0, pages_BW.shape[1] - 1)
    page_of_BT = jnp.where(valid_BT, jnp.take_along_axis(pages_BW, within_BT, axis=1), SCRATCH_PAGE)
    # p[:, page_BT, :, offset_BT] is [B, T, layers, K, H]: the indexed axes first
    new_kv = tuple(new.transpose(1, 2, 0, 3, 4) for new in new_kv)
    if len(pool) == 2:
        return tuple(p.at[:, page_of_BT, :, offset_BT].set(new) for p, new in zip(pool, new_kv))
    global_ids, local_ids = layers
    ring_of_BT = jnp.take_along_axis(ring_BR, block_BT % ring_BR.shape[1], axis=1)
    ring_of_BT = jnp.where(valid_BT, ring_of_BT, SCRATCH_PAGE)
    k_new, v_new = new_kv
    return (
        pool[0].at[:, page_of_BT, :, offset_BT].set(k_new[:, :, global_ids]),
        pool[1].at[:, page_of_BT, :, offset_BT].set(v_new[:, :, global_ids]),
        pool[2].at[:, ring_of_BT, :, offset_BT].set(k_new[:, :, local_ids]),
        pool[3].at[:, ring_of_BT, :, offset_BT].set(v_new[:, :, local_ids]),
    )
