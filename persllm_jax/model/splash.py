"""Splash attention: the Pallas TPU flash-attention kernel, causal, with segment ids, sharded
over the mesh by `shard_map` (batch over `data`/`fsdp`, heads over `tensor`; `over_batch_and_heads`).

The kernel takes one sequence at a time with heads leading ([N, T, H] queries, [K, S, H] keys
and values, N a multiple of K, so MHA, GQA and MQA are one case) and is mapped over the batch.
Tokens attend only within their own segment id; id 0 is padding. Lengths are padded to the
kernel's block (a multiple of 128 lanes) with padding segments and cut back after.

On a TPU the compiled kernel runs; on any other platform the same kernel runs in Pallas
interpret mode (slow, exact: for tests). The choice is made when the step is lowered, by the
platform it is lowered for, so `persllm compile` on a CPU host compiles the real TPU kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from persllm_jax.model.sharding import over_batch_and_heads

_LANES = 128  # the kernel's key blocks must be whole vector lanes
_MAX_BLOCK = 512  # query / key block; 512 is the kernel's sweet spot on v5p and v6e at seq >= 1k


def padded_length(t: int) -> int:
    """The sequence length the kernel runs at: a multiple of its block."""
    lanes = -(-t // _LANES) * _LANES
    return lanes if lanes <= _MAX_BLOCK else -(-t // _MAX_BLOCK) * _MAX_BLOCK


def _kernel(t: int, num_heads: int, interpret: bool, window: int = 0):
    block = min(_MAX_BLOCK, t)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    # a sliding window of w tokens: each query reads itself and the w - 1 keys before it
    one = (
        splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
        if window
        else splash.CausalMask((t, t))
    )
    mask = splash.MultiHeadMask([one] * num_heads)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _per_device(q_BTNH, k_BTKH, v_BTKH, segment_BT, *, interpret: bool, scale: float, window: int = 0):
    """Attention over the shards one device holds: [b, T, n, H] -> [b, T, n, H]."""
    b, t, n, h = q_BTNH.shape
    t_pad = padded_length(t)
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    # Scaling queries before the kernel (it does not scale) in fp32, then back to compute dtype.
    q_BNTH = jnp.pad((q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype), pad).transpose(0, 2, 1, 3)
    k_BKTH = jnp.pad(k_BTKH, pad).transpose(0, 2, 1, 3)
    v_BKTH = jnp.pad(v_BTKH, pad).transpose(0, 2, 1, 3)
    segment_BT = jnp.pad(segment_BT.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
    kernel = _kernel(t_pad, n, interpret, window)

    def one_sequence(q, k, v, segment):
        return kernel(q, k, v, splash.SegmentIds(q=segment, kv=segment))

    out_BNTH = jax.vmap(one_sequence)(q_BNTH, k_BKTH, v_BKTH, segment_BT)
    return out_BNTH.transpose(0, 2, 1, 3)[:, :t]


def _on_platform(q, k, v, segment, *, scale: float, window: int = 0):
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        segment,
        tpu=functools.partial(_per_device, interpret=False, scale=scale, window=window),
        default=functools.partial(_per_device, interpret=True, scale=scale, window=window),
    )


def splash_attention(
    q_BTNH, k_BTKH, v_BTKH, segment_BT, *, scale: float | None = None, window=None, window_size=0
):
    """Causal attention within segments; `segment_BT` int, 0 = padding. Returns [B, T, N, H].
    Scores are scaled by `scale` (default head_dim ** -0.5).

    A kernel's mask is static, so a layer scan that mixes local and global layers gives the
    model's `window_size` and this layer's traced `window` (a local layer's equals window_size):
    both kernels are compiled and `lax.cond` runs the layer's."""
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    args = (q_BTNH, k_BTKH, v_BTKH, segment_BT)
    kernel = functools.partial(_on_platform, scale=scale)
    if window is None or not window_size:
        return over_batch_and_heads(kernel, *args)
    local = functools.partial(_on_platform, scale=scale, window=window_size)
    return jax.lax.cond(
        window <= window_size,
        lambda *a: over_batch_and_heads(local, *a),
        lambda *a: over_batch_and_heads(kernel, *a),
        *args,
    )
