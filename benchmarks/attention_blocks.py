"""XLA attention, block-wise within segments against dense over the [T, T] mask, forward plus
backward, on packed rows like the persona data's (segments of `--min`..`--max` tokens, the last
row part padding), at several block sizes, in one run.

    python benchmarks/attention_blocks.py                      # 8 x 2048, SmolLM2's 9 / 3 heads of 64
    python benchmarks/attention_blocks.py --rows 4 --seq 4096 --blocks 256,512

Prints the mean time of a jitted gradient step of the attention alone, and how much of the dense
product each block size reads (key blocks read / (T / block)^2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.model.attention import Segments, attend
from persllm_jax.model.block_attention import _first_key_blocks


def packed_rows(rows: int, seq: int, shortest: int, longest: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    segments = np.zeros((rows, seq), np.int32)
    for row in range(rows):
        at, index = 0, 1
        while True:
            length = int(rng.integers(shortest, longest + 1))
            if at + length > seq:
                break
            segments[row, at : at + length] = index
            at, index = at + length, index + 1
    return segments


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min", type=int, default=120, help="shortest segment")
    p.add_argument("--max", type=int, default=420, help="longest segment")
    p.add_argument("--blocks", default="128,256,512")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.rows, args.seq)
    q = jnp.asarray(rng.normal(size=(*shape, args.heads, args.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(*shape, args.kv_heads, args.head_dim)), jnp.float32) for _ in "kv")
    segments = jnp.asarray(packed_rows(*shape, args.min, args.max, seed=1))
    real = float((segments > 0).mean())

    def step(mask):
        def loss(q, k, v):
            return (attend(q, k, v, mask, "xla") ** 2).sum()

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    # the dense path's mask: same segment, causal, not padding
    dense_mask = segments[:, :, None] == segments[:, None, :]
    dense_mask &= jnp.tril(jnp.ones((args.seq, args.seq), bool))[None] & (segments[:, None, :] > 0)
    print(f"rows {args.rows} x {args.seq}, heads {args.heads}/{args.kv_heads} x {args.head_dim}, "
          f"segments {args.min}-{args.max} tokens, {real:.1%} of tokens real")  # fmt: skip
    base = timed(step(dense_mask), q, k, v, repeats=args.repeats)
    print(f"{'dense':>12}: {base:8.3f} s  reads 100.0% of the [T, T] product")
    for block in (int(b) for b in args.blocks.split(",")):
        n = args.seq // block
        first = np.asarray(_first_key_blocks(segments, block))
        read = sum(max(0, i + 1 - f) for i, f in enumerate(first)) / n**2
        seconds = timed(step(Segments(segments, block)), q, k, v, repeats=args.repeats)
        print(
            f"{'block ' + str(block):>12}: {seconds:8.3f} s  reads {read:6.1%}  ({base / seconds:.2f}x dense)"
        )


if __name__ == "__main__":
    main()
