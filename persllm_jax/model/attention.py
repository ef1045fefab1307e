"""Attention: grouped-query attention in XLA (block-wise within segments for training rows, over a
boolean mask for generation), cuDNN's fused causal kernel or the Pallas splash kernel (TPU), rotary
embeddings on queries and keys, and the KV-cache write used by generation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from persllm_jax.model import rope
from persllm_jax.model.block_attention import BLOCK, block_attention
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.layers import Linear, RMSNorm, subkeys
from persllm_jax.model.sharding import constrain
from persllm_jax.model.splash import splash_attention

# Large negative instead of -inf so that a fully masked row (a left-padding query) gives a
# uniform softmax rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class Segments(NamedTuple):
    """Segment ids [B, T] (1, 2, ... per sequence, 0 = padding) for XLA's block-wise attention, and
    its block size."""

    segment_ids_BT: jax.Array
    block: int = BLOCK


class DenseMask(NamedTuple):
    """A boolean [B, T, S] mask for cuDNN, which otherwise takes per-row lengths."""

    mask_BTS: jax.Array


def attend(
    q_BTNH, k_BSKH, v_BSKH, mask, impl: str = "xla", *, scale: float | None = None, window=None, window_size=0
):
    """Grouped-query attention; N query heads share K key/value heads. Returns [B, T, N, H].

    Scores are scaled by `scale` (default head_dim ** -0.5). `window` (xla with `Segments`, splash;
    may be traced) keeps, for each query, only the keys fewer than `window` tokens before it; splash
    also needs the model's static `window_size`; a dense mask already holds any window.

    `mask` is `Segments` (xla, causal within segments) or a boolean [B, T, S] (xla); for cudnn the number of real keys per row [B] (causal,
    right padding: cuDNN's fused kernel takes lengths), or a `DenseMask` for packed rows;
    for splash the segment id of every token [B, T] (causal within a segment, 0 = padding)."""
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    if impl == "splash":
        return splash_attention(
            q_BTNH, k_BSKH, v_BSKH, mask, scale=scale, window=window, window_size=window_size
        )
    if impl == "cudnn":
        if isinstance(mask, DenseMask):  # packed rows: the block-diagonal mask
            return jax.nn.dot_product_attention(
                q_BTNH,
                k_BSKH,
                v_BSKH,
                mask=mask.mask_BTS[:, None],
                scale=scale,
                is_causal=True,
                implementation="cudnn",
            )
        return jax.nn.dot_product_attention(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            scale=scale,
            is_causal=True,
            key_value_seq_lengths=mask,
            implementation="cudnn",
        )
    if isinstance(mask, Segments):
        return block_attention(
            q_BTNH, k_BSKH, v_BSKH, mask.segment_ids_BT, mask.block, scale=scale, window=window
        )
    mask_BTS = mask
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg

        def projection(name, d_in, d_out, axes, bias):
            path = f"layers/attn/{name}"
            return Linear(d_in, d_out, axes, bias=bias, cfg=cfg, rngs=rngs, path=path)

        self.q_proj = projection("q_proj", d, cfg.num_heads * hd, ("embed", "heads"), cfg.qkv_bias)
        self.k_proj = projection("k_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg.qkv_bias)
        self.v_proj = projection("v_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg.qkv_bias)
        self.o_proj = projection("o_proj", cfg.num_heads * hd, d, ("heads", "embed"), cfg.o_bias)
        # Qwen3 normalizes each head's queries and keys (over head_dim) before rotary.
        self.q_norm = RMSNorm(hd, cfg) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg) if cfg.qk_norm else None

    def __call__(self, x_BTD, cos, sin, mask, cache=None, dropout_key=None, window=None):
        """`dropout_key`: the adapters' dropout in a training step (layers.Linear). `window`: this
        layer's sliding window (None: full attention), for the training path's block attention.

        With `cache` (cached decoding), a function of this step's rotated queries, keys and values
        that writes the keys and values into the KV cache and attends over it (decoder.py); it
        returns the attention output [B, T, N, H] and the updated cache, returned here beside the
        projected output."""
        cfg = self.cfg
        b, t, _ = x_BTD.shape
        q_key, k_key, v_key, o_key = subkeys(dropout_key, 4)
        q = self.q_proj(x_BTD, q_key).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_BTD, k_key).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_BTD, v_key).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(rope.apply_rotary(q, cos, sin), ("batch", "length", "act_heads", None))
        k = constrain(rope.apply_rotary(k, cos, sin), ("batch", "length", "act_heads", None))
        if cache is None:
            out = attend(
                q,
                k,
                v,
                mask,
                cfg.attention_impl,
                scale=cfg.attention_scale,
                window=window,
                window_size=cfg.sliding_window,
            )
            return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim), o_key)
        out, new_cache = cache(q, k, v)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), new_cache
