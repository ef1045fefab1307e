"""Block-wise causal attention within segments: the XLA path for training and evaluation rows.

Queries and keys are cut into blocks of `BLOCK` tokens. Query block i reads key blocks from the
first block that holds the start of one of its queries' segments up to block i itself (causal), so
a packed row of short segments costs about (segment length + block) keys per query instead of the
row's length, a one-sequence row about half of the dense product, and nothing of size [T, T] is held.
The softmax runs online (a running maximum and sum per query), and the backward pass recomputes the
probabilities block by block from the saved log-sum-exp (a custom VJP), as flash attention does.

The range of key blocks comes from the segment ids on the device, so it changes from batch to batch
without a recompile: the block loops are `while` loops with traced bounds.

The mask is the dense path's: a key is read when it is in the query's segment, not after the query,
and not padding (id 0). A sliding-window layer (Gemma 3's local layers) also reads only the keys
fewer than `window` tokens before the query: key blocks wholly before the window are skipped, not
masked. `window` is traced (one scan body serves local and global layers). A padding query reads nothing and gives zeros (the dense path gives the
mean of the values there); no loss reads a padding position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from persllm_jax.model.sharding import over_batch_and_heads

BLOCK = 128  # query and key block; rows are padded up to a multiple of it (benchmarks/attention_blocks.py)
NO_WINDOW = 2**30  # the window of a full-attention layer: longer than any row
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so a fully masked block gives no NaN
_F32 = jnp.float32


def _first_key_blocks(segment_BT, block: int):
    """For each query block, the first key block it needs: where the earliest segment of any of its
    queries (in any row) starts. [T // block] int32; a block of padding queries only gets the number
    of blocks, so it reads nothing."""
    b, t = segment_BT.shape
    ids = jnp.clip(segment_BT, 0, t)
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # The first index of every segment id in its row (exact even if an id comes back later in the row).
    first = jnp.full((b, t + 1), t, jnp.int32).at[jnp.arange(b)[:, None], ids].min(index)
    start_BT = jnp.where(segment_BT > 0, jnp.take_along_axis(first, ids, axis=1), t)
    return start_BT.reshape(b, t // block, block).min(axis=(0, 2)) // block


def _block(x, j, block: int, axis: int = 1):
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=axis)


def _first_in_window(i, window, block: int):
    """The first key block that holds a key within `window` of query block i's first query."""
    return jnp.maximum(i * block - window + 1, 0) // block


def _scores(q_i, seg_i, i, k, segment_BT, j, block: int, scale: float, window):
    """Scaled scores of query block i against key block j, masked: [B, K, G, bq, bk] fp32, and the
    boolean mask [B, 1, 1, bq, bk]."""
    k_j, seg_j = _block(k, j, block), _block(segment_BT, j, block)
    s = jnp.einsum("btkgh,bskh->bkgts", q_i, k_j, preferred_element_type=_F32) * scale
    rows = i * block + jnp.arange(block)
    cols = j * block + jnp.arange(block)
    behind = rows[:, None] - cols[None, :]
    allowed = (
        (seg_i[:, :, None] == seg_j[:, None, :]) & (seg_j[:, None, :] > 0) & (behind >= 0) & (behind < window)
    )
    allowed = allowed[:, None, None]
    return jnp.where(allowed, s, _NEG), allowed


def _forward(q, k, v, segment_BT, window, block: int, scale: float):
    """q [B, T, K, G, H], k and v [B, T, K, H] -> out [B, T, K, G, H] and log-sum-exp [B, K, G, T]."""
    b, t, kh, g, h = q.shape
    first = _first_key_blocks(segment_BT, block)

    def query_block(i, carry):
        out, lse = carry
        q_i, seg_i = _block(q, i, block), _block(segment_BT, i, block)

        def key_block(j, state):
            top, total, acc = state  # running maximum and sum of exp(score - top) per query
            s, allowed = _scores(q_i, seg_i, i, k, segment_BT, j, block, scale, window)
            top_new = jnp.maximum(top, s.max(-1))
            p = jnp.where(allowed, jnp.exp(s - top_new[..., None]), 0.0)
            alpha = jnp.exp(top - top_new)
            pv = jnp.einsum(
                "bkgts,bskh->bkgth", p.astype(v.dtype), _block(v, j, block), preferred_element_type=_F32
            )
            return top_new, alpha * total + p.sum(-1), alpha[..., None] * acc + pv

        init = (
            jnp.full((b, kh, g, block), _NEG, _F32),
            jnp.zeros((b, kh, g, block), _F32),
            jnp.zeros((b, kh, g, block, h), _F32),
        )
        start = jnp.maximum(first[i], _first_in_window(i, window, block))
        top, total, acc = jax.lax.fori_loop(start, i + 1, key_block, init)
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        out_i = (acc / total[..., None]).transpose(0, 3, 1, 2, 4).astype(out.dtype)
        lse_i = jnp.where(seen, top + jnp.log(total), 0.0)
        out = jax.lax.dynamic_update_slice_in_dim(out, out_i, i * block, axis=1)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * block, axis=3)

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((b, kh, g, t), _F32))
    return jax.lax.fori_loop(0, t // block, query_block, init)


def _backward(block: int, scale: float, residuals, d_out):
    q, k, v, segment_BT, window, out, lse = residuals
    first = _first_key_blocks(segment_BT, block)
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(_F32), out.astype(_F32))

    def query_block(i, carry):
        dq, dk, dv = carry
        q_i, seg_i, do_i = _block(q, i, block), _block(segment_BT, i, block), _block(d_out, i, block)
        lse_i, delta_i = _block(lse, i, block, axis=3), _block(delta, i, block, axis=3)

        def key_block(j, state):
            dq_i, dk, dv = state
            s, allowed = _scores(q_i, seg_i, i, k, segment_BT, j, block, scale, window)
            p = jnp.where(allowed, jnp.exp(s - lse_i[..., None]), 0.0)
            dv_j = jnp.einsum("bkgts,btkgh->bskh", p.astype(do_i.dtype), do_i, preferred_element_type=_F32)
            dp = jnp.einsum("btkgh,bskh->bkgts", do_i, _block(v, j, block), preferred_element_type=_F32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
            dq_i = dq_i + jnp.einsum(
                "bkgts,bskh->btkgh", ds, _block(k, j, block), preferred_element_type=_F32
            )
            dk_j = jnp.einsum("bkgts,btkgh->bskh", ds, q_i, preferred_element_type=_F32)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _block(dk, j, block) + dk_j, j * block, axis=1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _block(dv, j, block) + dv_j, j * block, axis=1)
            return dq_i, dk, dv

        dq_i = jnp.zeros(q_i.shape, _F32)
        start = jnp.maximum(first[i], _first_in_window(i, window, block))
        dq_i, dk, dv = jax.lax.fori_loop(start, i + 1, key_block, (dq_i, dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block, axis=1), dk, dv

    init = tuple(jnp.zeros(x.shape, _F32) for x in (q, k, v))
    dq, dk, dv = jax.lax.fori_loop(0, q.shape[1] // block, query_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, segment_BT, window, block, scale):
    return _forward(q, k, v, segment_BT, window, block, scale)[0]


def _attention_fwd(q, k, v, segment_BT, window, block, scale):
    out, lse = _forward(q, k, v, segment_BT, window, block, scale)
    return out, (q, k, v, segment_BT, window, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def block_attention(q_BTNH, k_BTKH, v_BTKH, segment_BT, block: int = BLOCK, *, scale=None, window=None):
    """Causal attention within segments (`segment_BT` int, 0 = padding); N query heads share K
    key/value heads. Returns [B, T, N, H]. Under a mesh it runs on each device's shards.

    `scale` multiplies the scores (default head_dim ** -0.5); `window` (an int32 scalar, may be
    traced) limits each query to the keys fewer than `window` tokens before it (default: none)."""
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    window = jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)
    per_device = functools.partial(_per_device, block=block, scale=scale)
    return over_batch_and_heads(per_device, q_BTNH, k_BTKH, v_BTKH, segment_BT, window)


def _per_device(q_BTNH, k_BTKH, v_BTKH, segment_BT, window, *, block: int, scale: float):
    b, t, n, h = q_BTNH.shape
    kh = k_BTKH.shape[2]
    block = min(block, t)
    t_pad = -(-t // block) * block
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    q = jnp.pad(q_BTNH, pad).reshape(b, t_pad, kh, n // kh, h)
    k, v = jnp.pad(k_BTKH, pad), jnp.pad(v_BTKH, pad)
    segment = jnp.pad(segment_BT.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
    out = _attention(q, k, v, segment, window, block, scale)
    return out.reshape(b, t_pad, n, h)[:, :t]
