"""The matrix products of one decode step, as XLA on CPU runs them beside PyTorch and NumPy.

A decode step multiplies each layer's weights by one row per sequence being decoded: for
SmolLM2-135M, [rows, 576] by [576, 1536] and the like, 30 layers, then the [rows, 576] by
[576, 49152] head. With few rows these products read every weight once and compute little, so a
step should cost about what reading the weights costs; this prints what each library takes for
the products of one step (fp32, every weight matrix its own array, so nothing is sliced or copied),
and the rate it computes at.

    python benchmarks/decode_matmuls.py                   # rows 1, 8, 16, 64
    python benchmarks/decode_matmuls.py --rows 8 --repeats 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, KV_WIDTH = 576, 1536, 49152, 30, 192
# one layer's products as (inputs, outputs): q, k, v, o, gate, up, down
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV_WIDTH), (HIDDEN, KV_WIDTH), (HIDDEN, HIDDEN)] + [
    (HIDDEN, INTERMEDIATE),
    (HIDDEN, INTERMEDIATE),
    (INTERMEDIATE, HIDDEN),
]


def weights(rng) -> list[np.ndarray]:
    mats = [rng.standard_normal(shape, np.float32) * 0.02 for _ in range(LAYERS) for shape in LAYER_SHAPES]
    return mats + [rng.standard_normal((HIDDEN, VOCAB), np.float32) * 0.02]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_products(rows: int, mats: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Seconds for every product of one decode step over `rows` rows, per library (each product's
    input a fresh [rows, in] block, so no library can chain them into fewer calls)."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((rows, m.shape[0]), np.float32) for m in mats]
    jx, jm = [jnp.asarray(x) for x in xs], [jnp.asarray(m) for m in mats]

    @jax.jit
    def xla(xs, ms):
        return [x @ m for x, m in zip(xs, ms)]

    tx, tm = [torch.from_numpy(x) for x in xs], [torch.from_numpy(m) for m in mats]

    def with_torch():
        with torch.no_grad():
            return [x @ m for x, m in zip(tx, tm)]

    return {
        "XLA (jax.jit)": median_seconds(lambda: jax.block_until_ready(xla(jx, jm)), repeats),
        "PyTorch": median_seconds(with_torch, repeats),
        "NumPy": median_seconds(lambda: [x @ m for x, m in zip(xs, mats)], repeats),
    }


def large_product_rate(repeats: int) -> float:
    """GFLOP/s of one 1024 x 1024 x 1024 fp32 product in XLA: what this CPU computes at when a
    product is large enough to keep it busy."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32)
    product = jax.jit(lambda a: a @ a)
    return 2 * 1024**3 / median_seconds(lambda: jax.block_until_ready(product(a)), repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    mats = weights(np.random.default_rng(0))
    weight_mb = sum(m.nbytes for m in mats) / 1e6
    print(f"one decode step's products: {len(mats)} matrices, {weight_mb:.0f} MB of fp32 weights")
    print("| rows | library | ms per step | GFLOP/s | GB/s of weights |")
    print("|---|---|---|---|---|")
    print(f"a 1024-cube product in XLA: {large_product_rate(args.repeats):.0f} GFLOP/s")
    for rows in args.rows:
        flops = 2 * rows * sum(m.size for m in mats)
        for name, seconds in step_products(rows, mats, args.repeats).items():
            print(
                f"| {rows} | {name} | {1e3 * seconds:.1f} | {flops / seconds / 1e9:.0f} "
                f"| {weight_mb / 1e3 / seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
