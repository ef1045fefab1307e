"""The building blocks of the decoder: parameters with logical axes, the linear projection, RMS
normalization and the SwiGLU MLP. Parameters live in `param_dtype`, matmuls run in
`compute_dtype`, and normalization statistics in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persllm_jax.model import quantization
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.sharding import constrain


def param(rngs: nnx.Rngs, shape, axes, dtype, std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's weight).

    When the config's LoRA targets match `path`, an adapter (Flax's `nnx.LoRA`: lora_a [in, rank],
    lora_b [rank, out], b zero at the start, both `nnx.LoRAParam`, always float32: they are what
    trains) adds scale * x @ a @ b, so a new adapter leaves the output unchanged.

    With `cfg.lora_dropout`, a training call given `dropout_key` drops that fraction of the
    adapter's input (scaled by 1 / (1 - rate), as PEFT's LoRA dropout); the base path never drops.

    With `cfg.base_quantization` (QLoRA), the frozen kernel is held as codes and scales
    (quantization.py) and dequantized into the compute dtype at each call; `kernel` is then None."""

    def __init__(self, d_in, d_out, axes, *, bias, cfg: ModelConfig, rngs: nnx.Rngs, path: str = ""):
        dtype = jnp.dtype(cfg.param_dtype)
        kernel = param(rngs, (d_in, d_out), axes, dtype)
        self.qtype = cfg.base_quantization
        if self.qtype == "none":
            self.kernel = kernel
        else:
            codes, scale = quantization.quantize(kernel.get_value(), self.qtype)
            self.kernel = None
            self.kernel_codes = quantization.QuantizedBase(codes, logical_axes=axes)
            scale_axes = (None, axes[1]) if self.qtype == "int8" else axes
            self.kernel_scale = quantization.QuantizedBase(scale, logical_axes=scale_axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), logical_axes=axes[1:]) if bias else None
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        adapted = path in cfg.lora_paths()
        self.lora = (
            nnx.LoRA(
                d_in,
                cfg.lora_rank,
                d_out,
                dtype=self.compute_dtype,
                param_dtype=jnp.float32,
                a_metadata={"logical_axes": (axes[0], None)},
                b_metadata={"logical_axes": (None, axes[1])},
                rngs=rngs,
            )
            if adapted
            else None
        )
        self.lora_scale = cfg.lora_scale if adapted else 0.0
        self.lora_dropout = cfg.lora_dropout if adapted else 0.0

    def __call__(self, x, dropout_key=None):
        x = x.astype(self.compute_dtype)
        y = x @ self.compute_kernel()
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        if self.lora is not None:
            y = y + self.lora(self._dropped(x, dropout_key)) * jnp.asarray(
                self.lora_scale, self.compute_dtype
            )
        return y

    def _dropped(self, x, dropout_key):
        """The adapter's input: `x` with `lora_dropout` of it zeroed (and the rest scaled up) when a
        key is given, `x` itself otherwise (evaluation, generation, the reference pass)."""
        rate = self.lora_dropout
        if dropout_key is None or rate == 0.0:
            return x
        keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))

    def compute_kernel(self):
        """The kernel in the compute dtype (dequantized when the base is quantized)."""
        if self.kernel is not None:
            return self.kernel[...].astype(self.compute_dtype)
        codes, scale = self.kernel_codes[...], self.kernel_scale[...]
        return quantization.dequantize(codes, scale, self.qtype, self.compute_dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * w. Gemma stores w as the offset from one (weights start at zero) and applies it in
    fp32 before the cast, as transformers does for each family."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.offset = 1.0 if cfg.is_gemma else 0.0
        start = jnp.zeros if cfg.is_gemma else jnp.ones
        self.weight = nnx.Param(start((dim,), jnp.dtype(cfg.param_dtype)), logical_axes=("norm",))
        self.eps = cfg.rms_norm_eps
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(self.compute_dtype)
        return self.weight[...].astype(self.compute_dtype) * normed.astype(self.compute_dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); Gemma's GeGLU puts the tanh-approximated GELU in silu's place."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gelu = cfg.is_gemma
        d, f = cfg.hidden_size, cfg.intermediate_size
        options = dict(bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), path="layers/mlp/gate_proj", **options)
        self.up_proj = Linear(d, f, ("embed", "mlp"), path="layers/mlp/up_proj", **options)
        self.down_proj = Linear(f, d, ("mlp", "embed"), path="layers/mlp/down_proj", **options)

    def __call__(self, x_BTD, dropout_key=None):
        gate_key, up_key, down_key = subkeys(dropout_key, 3)
        gate = self.gate_proj(x_BTD, gate_key)
        gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        hidden = gate * self.up_proj(x_BTD, up_key)
        return self.down_proj(constrain(hidden, ("batch", "length", "act_mlp")), down_key)


def subkeys(key, n: int) -> tuple:
    """`n` independent keys from `key` (n Nones without one: no dropout)."""
    return (None,) * n if key is None else tuple(jax.random.split(key, n))
