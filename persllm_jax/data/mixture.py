"""A deterministic mixture of data sources: the order in which examples are seen.

An epoch holds every source `repeats` times: floor(repeats) full copies plus a random subset of
round(frac(repeats) * n) examples (drawn again each epoch, from seed, epoch and source, so all of
a partly used source is seen over epochs), shuffled by a permutation derived from seed and epoch.
Epochs are laid end to end into one stream of (source, index) pairs, crossing epoch boundaries
without dropping anything. Everything is a pure function of (sizes, repeats, seed, stream,
position), so resuming at a position yields exactly what an uninterrupted run would have seen.

The training input pipeline (data/pipeline.py) gives each batch row its own mixture over the
records dealt to it (`stream` = the row); `global_batch` / `batch_rows` read one stream as
consecutive global batches.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mixture:
    """Sources of `sizes[s]` examples, each repeated `repeats[s]` times per epoch, shuffled with `seed`."""

    sizes: tuple[int, ...]
    repeats: tuple[float, ...]
    seed: int = 0
    # Independent orders from one seed: each batch row of the input pipeline has its own stream.
    stream: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        object.__setattr__(self, "repeats", tuple(float(r) for r in self.repeats))
        if len(self.sizes) != len(self.repeats):
            raise ValueError(
                f"{len(self.sizes)} source sizes but {len(self.repeats)} repeats; give one per source"
            )
        for s, (n, r) in enumerate(zip(self.sizes, self.repeats)):
            if n < 0 or not (r >= 0 and math.isfinite(r)):
                raise ValueError(
                    f"source {s}: expected size >= 0 and finite repeats >= 0, got size {n}, repeats {r}"
                )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.epoch_size == 0:
            raise ValueError(f"the mixture is empty: sizes {self.sizes} with repeats {self.repeats}")

    @property
    def epoch_size(self) -> int:
        """Examples per epoch (the same every epoch)."""
        return sum(_copies(n, r)[0] * n + _copies(n, r)[1] for n, r in zip(self.sizes, self.repeats))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The [epoch_size, 2] (source, index) pairs of one epoch, in training order (read-only)."""
        return _cached_epoch_order(self.sizes, self.repeats, self.seed, int(epoch), self.stream)

    def examples(self, start: int, stop: int) -> np.ndarray:
        """Stream positions [start, stop) as [stop - start, 2] (source, index) pairs."""
        return self.at(np.arange(start, stop, dtype=np.int64))

    def at(self, positions) -> np.ndarray:
        """The (source, index) pairs at the given stream positions, [len(positions), 2]."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.epoch_size)
        out = np.empty((len(positions), 2), dtype=np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            out[rows] = self.epoch_order(int(epoch))[offsets[rows]]
        return out

    def global_batch(self, position: int, batch_size: int) -> np.ndarray:
        """The [batch_size, 2] examples of the global batch after `position` batches."""
        return self.examples(position * batch_size, (position + 1) * batch_size)

    def batch_rows(self, position: int, batch_size: int, rows) -> np.ndarray:
        """Rows `rows` of the global batch at `position` (the rows one process loads)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= batch_size):
            raise ValueError(f"batch rows {rows.min()}..{rows.max()} are outside a batch of {batch_size}")
        return self.at(position * batch_size + rows)


def epoch_order(
    num_examples_per_source: Sequence[int], repeats: Sequence[float], seed: int, epoch: int
) -> np.ndarray:
    """The [N, 2] (source, index) pairs of one epoch of the mixture, in training order."""
    return Mixture(tuple(num_examples_per_source), tuple(repeats), seed).epoch_order(epoch)


def batch_rows(
    num_examples_per_source: Sequence[int],
    repeats: Sequence[float],
    seed: int,
    position: int,
    batch_size: int,
    rows,
) -> np.ndarray:
    """The (source, index) pairs at rows `rows` of the global batch at `position`."""
    mixture = Mixture(tuple(num_examples_per_source), tuple(repeats), seed)
    return mixture.batch_rows(position, batch_size, rows)


def _copies(size: int, repeats: float) -> tuple[int, int]:
    """(full copies, size of the extra random subset) for one source; the subset count rounds half up."""
    whole = math.floor(repeats)
    return whole, min(size, math.floor((repeats - whole) * size + 0.5))


@functools.lru_cache(maxsize=1024)
def _cached_epoch_order(
    sizes: tuple[int, ...], repeats: tuple[float, ...], seed: int, epoch: int, stream: int | None = None
) -> np.ndarray:
    """One epoch's order; cached because consecutive batches (and each row's next example) read
    the same epoch."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    key = [seed] if stream is None else [seed, 1_000_003 + stream]
    parts = []
    for source, (size, r) in enumerate(zip(sizes, repeats)):
        whole, extra = _copies(size, r)
        # Each source draws its subset from its own stream, so changing one source leaves the others' alone.
        subset_rng = np.random.default_rng([*key, epoch, 1 + source])
        indices = np.concatenate(
            [np.tile(np.arange(size, dtype=np.int64), whole), np.sort(subset_rng.permutation(size)[:extra])]
        )
        parts.append(np.stack([np.full(len(indices), source, dtype=np.int64), indices], axis=1))
    order = np.concatenate(parts)
    order = order[np.random.default_rng([*key, epoch, 0]).permutation(len(order))]
    order.flags.writeable = False
    return order
