"""Rotary position embeddings as transformers computes them (default, linear and llama3 types)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from persllm_jax.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2], float32, in transformers' arithmetic order;
    `local`: those of the sliding-window layers (their own base and scaling)."""
    dim = cfg.head_dim
    theta, scaling = (
        (cfg.local_rope_theta, cfg.local_rope_scaling) if local else (cfg.rope_theta, cfg.rope_scaling)
    )
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    params = scaling or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, params)
    return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(
    cfg: ModelConfig, positions_BT: jnp.ndarray, local: bool = False
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [B, T, head_dim] for integer positions, float32."""
    inv_freq = jnp.asarray(inverse_frequencies(cfg, local))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_BTNH: jnp.ndarray, cos_BTH: jnp.ndarray, sin_BTH: jnp.ndarray) -> jnp.ndarray:
    """Rotate the two halves of each head (transformers' rotate_half convention)."""
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return (x_BTNH * cos.astype(x_BTNH.dtype) + rotated * sin.astype(x_BTNH.dtype)).astype(x_BTNH.dtype)
