"""GPU correctness check (run by hand on a GPU machine; tests never need a GPU).

1. Our decoder against transformers' PyTorch model on the GPU, fp32 with full-precision matmuls
   (no TF32 on either side), for the tiny test variants: max abs logit difference <= 1e-4.
2. The cuDNN fused attention path against the XLA path in bf16, same weights, right padding:
   relative difference of logits at the scale of bf16 rounding, same argmax almost everywhere.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def parity() -> bool:
    import torch

    from persllm_jax import load_pretrained
    from tests import hf_fixtures

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    for variant in sorted(hf_fixtures.TINY_VARIANTS):
        with tempfile.TemporaryDirectory() as directory:
            hf_model = hf_fixtures.save_tiny(variant, Path(directory)).cuda()
            model, _ = load_pretrained(directory)
            ids = np.random.RandomState(0).randint(0, hf_fixtures.TINY_COMMON["vocab_size"], (2, 48))
            with torch.no_grad():
                reference = hf_model(torch.tensor(ids).cuda()).logits.float().cpu().numpy()
            ours = np.asarray(model(jnp.asarray(ids)))
            diff = float(np.abs(ours - reference).max())
            ok &= diff <= 1e-4
            print(f"parity {variant:28s} max|logit|={np.abs(reference).max():6.2f} max diff={diff:.2e}")
    return ok


def cudnn_vs_xla() -> bool:
    from flax import nnx

    from persllm_jax.model.decoder import CausalLM
    from persllm_jax.model.presets import tiny

    cfg = tiny(
        vocab_size=4096,
        hidden_size=256,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        num_layers=4,
        compute_dtype="bfloat16",
    )
    xla = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(xla)
    cudnn = nnx.merge(nnx.split(CausalLM(cfg.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0)))[0], state)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 4096, (4, 256)))
    mask = jnp.asarray(np.arange(256)[None, :] < np.asarray([256, 200, 130, 64])[:, None])
    a = np.asarray(nnx.jit(lambda m, x, k: m(x, k))(xla, ids, mask))
    b = np.asarray(nnx.jit(lambda m, x, k: m(x, k))(cudnn, ids, mask))
    valid = np.asarray(mask)
    rel = float(np.abs(a - b)[valid].max() / np.abs(a[valid]).max())
    agree = float((a.argmax(-1) == b.argmax(-1))[valid].mean())
    print(f"cudnn vs xla attention (bf16): max diff / max|logit| = {rel:.3e}, argmax agreement {agree:.4f}")
    return rel < 2e-2 and agree > 0.98


if __name__ == "__main__":
    print("devices:", jax.devices())
    results = [parity(), cudnn_vs_xla()]
    print("GPU CHECK", "PASSED" if all(results) else "FAILED")
    sys.exit(0 if all(results) else 1)
