"""A frozen base stored quantized (QLoRA): int8 with a scale per output channel, or NF4 (4-bit
NormalFloat codes) with a scale per block of 64 inputs, as QLoRA stores it. The arithmetic is
qwix's (`qwix.quantize` / `qwix.dequantize`, the quantizers Tunix uses); the codes and scales are
held here as plain variables with the kernel's logical axes, so they shard, donate and restore like
every other leaf of the train state, and each projection dequantizes its kernel into the compute
dtype when it runs.

Only the decoder layers' projection kernels are quantized (QLoRA's choice): the embedding, the
output head and the norms keep the model's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persllm_jax.model.config import QUANTIZATIONS

NF4_BLOCK = 64  # inputs per NF4 scale


class QuantizedBase(nnx.Variable):
    """Codes or scales of a frozen, quantized kernel: not a parameter, so never trained."""


def _qwix():
    import qwix

    return qwix


def quantize(kernel_IO: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scale) of one [in, out] kernel: int8 codes and a [1, out] scale, or NF4 codes (uint4)
    and a [in / 64, out] scale; scales in float32."""
    qwix = _qwix()
    x = kernel_IO.astype(jnp.float32)
    if qtype == "int8":
        q = qwix.quantize(x, jnp.int8, channelwise_axes=(1,))
    elif qtype == "nf4":
        if kernel_IO.shape[0] % NF4_BLOCK:
            raise ValueError(
                f"NF4 needs the input size ({kernel_IO.shape[0]}) to be a multiple of {NF4_BLOCK}"
            )
        q = qwix.quantize(x, "nf4", channelwise_axes=(1,), tiled_axes={0: NF4_BLOCK})
    else:
        raise ValueError(f"unknown quantization {qtype!r}; valid: {', '.join(QUANTIZATIONS[1:])}")
    return q.qvalue, q.scale


def quantize_stacked(kernel_LIO: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array]:
    """`quantize` of every layer of a stacked [layers, in, out] kernel, one layer at a time (so the
    quantizer's temporaries are one layer's)."""
    return jax.lax.map(lambda k: quantize(k, qtype), kernel_LIO)


def dequantize(codes: jax.Array, scale: jax.Array, qtype: str, dtype) -> jax.Array:
    """The kernel the codes stand for, in `dtype`."""
    qwix = _qwix()
    logical = jnp.int8 if qtype == "int8" else "nf4"
    return qwix.dequantize(qwix.QArray(qvalue=codes, scale=scale, qtype=logical)).astype(dtype)
