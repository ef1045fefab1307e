"""The training input pipeline, on grain: one stream per batch row, each reading its own shard of
every source, tokenizing in background threads, and packing (or padding) examples into rows.

Row r of a global batch of B rows reads the records whose position in their source (`_index`,
counted before split filtering) are dealt to r (`row_of_records`), orders them by its own mixture (the sources'
repeats, shuffled from `data.shuffle_seed` and r, see mixture.py) and turns each into a row:
- packed: grain's best-fit packer fills rows of `row_len` tokens from the row's next examples,
  several sequences per row, each a segment (ids 1, 2, ...; 0 is padding) with its own positions;
- unpacked: one example per row, right-padded.
A process builds only the streams of the rows its devices hold, so it reads only their shards,
and a row's content depends on nothing but B, the seed and the data: one process or many, the
same rows are trained. Each stream's grain iterator state is saved with every checkpoint; a
resumed run continues every row where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import grain.experimental as grain_exp
import numpy as np

from persllm_jax.data.mixture import Mixture

# grain's map datasets are random access; the stream of a row is as long as any run needs.
_STREAM_LENGTH = 2**62

Key = tuple[int, int]  # (source number, the record's `_index` in it)
Features = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    row_len: int  # tokens per row
    packing: bool
    packing_bins: int = 8  # rows the packer fills at once (more: less padding, more look-ahead)
    max_segments: int = 0  # most sequences in one row (0: no limit)
    threads: int = 2  # background tokenizing threads per row stream
    prefetch: int = 2  # rows made ahead of the training step, per row stream
    seed: int = 0


def row_of_records(num_records: int, batch_size: int, seed: int) -> np.ndarray:
    """The batch row that reads each record position of a source: the positions dealt to the
    rows in a seeded random order, so rows hold equal numbers of records (within one) and a
    pattern in the file (every 8th record held out) is spread over all rows."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(num_records)
    rows = np.empty(num_records, np.int64)
    rows[order] = np.arange(num_records) % batch_size
    return rows


@dataclasses.dataclass(frozen=True)
class RowShard:
    """What one batch row draws from: per source, its (key, example) pairs in source order."""

    row: int
    examples: tuple[tuple[tuple[Key, Any], ...], ...]
    # Per source, the units the row trains on: positions in `examples` that enter the pipeline as
    # one element (a preference pair and its mirror); None: each example is its own unit.
    units: tuple[tuple[tuple[int, ...], ...], ...] | None = None

    def source_units(self, source: int) -> tuple[tuple[int, ...], ...]:
        if self.units is None:
            return tuple((i,) for i in range(len(self.examples[source])))
        return self.units[source]

    def unit(self, source: int, index: int) -> list[tuple[Key, Any]]:
        """The (key, example) members of unit `index` of `source`."""
        members = (index,) if self.units is None else self.units[source][index]
        return [self.examples[source][i] for i in members]

    def mixture(self, repeats: Sequence[float], seed: int) -> Mixture:
        sizes = tuple(len(self.source_units(s)) for s in range(len(self.examples)))
        return Mixture(sizes, tuple(repeats), seed, stream=self.row)


def row_dataset(
    shard: RowShard,
    order: Mixture,
    features: Callable[[Key, Any], Features],
    names: Sequence[str],
    options: PipelineOptions,
    pad: Callable[[Features, int], Features],
    combine: Callable[[list[Features]], Features] | None = None,
) -> grain.IterDataset:
    """Row `shard.row`'s rows, forever: `features(key, example)` gives each example's unpadded
    per-token arrays `names` (equal lengths, <= row_len); packed rows add `segment_ids` and `positions`
    and drop nothing; unpacked rows are `pad(features, row_len)`. A unit of several examples
    (`shard.units`) is one element: `combine` of its members' features."""

    def example_at(position: int) -> Features:
        source, index = order.at([position])[0]
        return unit_features(shard.unit(int(source), int(index)), features, combine)

    ds = _rows(grain.MapDataset.range(0, _STREAM_LENGTH).map(example_at), names, options, pad)
    return grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=options.prefetch)


def one_pass(
    shard: RowShard,
    features: Callable[[Key, Any], Features],
    names: Sequence[str],
    options: PipelineOptions,
    pad: Callable[[Features, int], Features],
    combine: Callable[[list[Features]], Features] | None = None,
) -> grain.IterDataset:
    """Every example of the shard once, in source order (by units, as training reads them), as
    rows (packed or padded): for passes over the data that are not training (the DPO reference
    log-probs, evaluation)."""
    units = [
        shard.unit(source, index)
        for source in range(len(shard.examples))
        for index in range(len(shard.source_units(source)))
    ]
    dataset = grain.MapDataset.source(units).map(lambda unit: unit_features(unit, features, combine))
    return _rows(dataset, names, options, pad)


def unit_features(unit: list[tuple[Key, Any]], features, combine) -> Features:
    if len(unit) == 1:
        return features(*unit[0])
    if combine is None:
        raise ValueError(f"a unit of {len(unit)} examples but no way to combine them was given")
    return combine([features(*member) for member in unit])


def _rows(examples: grain.MapDataset, names, options: PipelineOptions, pad) -> grain.IterDataset:
    """Examples' features, made in background threads, into packed or padded rows."""
    read = grain.ReadOptions(num_threads=options.threads, prefetch_buffer_size=max(options.threads * 2, 1))
    ds = examples.to_iter_dataset(read)
    return pack(ds, options, names) if options.packing else ds.map(lambda f: pad(f, options.row_len))


def pack(ds: grain.IterDataset, options: PipelineOptions, names: Sequence[str]) -> grain.IterDataset:
    """grain's best-fit packing of per-token feature dicts (`names`) into rows of `row_len`; an
    element goes into a row only when every one of its features fits. Every feature is packed
    alike, so per-token metric ids and masks stay aligned with their tokens. Each `*input_ids`
    feature keeps its `_segment_ids` (0 = padding) and `_positions` (restarting at each
    sequence); for plain `input_ids` they are `segment_ids` and `positions`."""
    kept = [
        f"{name}_{extra}"
        for name in names
        if name.endswith("input_ids")
        for extra in ("segment_ids", "positions")
    ]

    def rename(row: Features) -> Features:
        out = {name: row[name] for name in (*names, *kept)}
        if "input_ids" in names:
            out["segment_ids"] = out.pop("input_ids_segment_ids").astype(np.int32)
            out["positions"] = out.pop("input_ids_positions").astype(np.int32)
        return out

    packed = grain_exp.BestFitPackIterDataset(
        ds,
        length_struct={name: options.row_len for name in names},
        num_packing_bins=options.packing_bins,
        seed=options.seed,
        shuffle_bins=False,
        max_sequences_per_bin=options.max_segments or None,
    )
    return packed.map(rename)


class HostRows:
    """The row streams of one process, stepped together: `next()` gives this process's rows of
    the next global batch, stacked in `rows` order."""

    def __init__(self, datasets: dict[int, grain.IterDataset]):
        self.rows = sorted(datasets)
        self._datasets = datasets
        self._iterators: dict[int, Any] = {}

    def _iterator(self, row: int):
        if row not in self._iterators:
            self._iterators[row] = iter(self._datasets[row])
        return self._iterators[row]

    def next(self) -> Features:
        parts = [next(self._iterator(row)) for row in self.rows]
        return {name: np.stack([p[name] for p in parts]) for name in parts[0]}

    def state(self) -> dict[str, Any]:
        """{row: grain iterator state} of this process's rows (JSON)."""
        return {str(row): self._iterator(row).get_state() for row in self.rows}

    def close(self) -> None:
        """Stop the background threads (before the interpreter exits)."""
        for iterator in self._iterators.values():
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        self._iterators.clear()

    def restore(self, states: dict[str, Any]) -> None:
        """Continue every row where `states` (the rows of every process) left it."""
        missing = [row for row in self.rows if str(row) not in states]
        if missing:
            raise ValueError(
                f"cannot resume: the checkpoint's input-pipeline state has no rows {missing[:8]}; it "
                "was written with another train.batch_size"
            )
        for row in self.rows:
            self._iterator(row).set_state(states[str(row)])


def pad_features(features: Features, row_len: int) -> Features:
    """Right-pad every per-token array to `row_len` with zeros."""
    out = {}
    for name, value in features.items():
        row = np.zeros(row_len, dtype=value.dtype)
        row[: len(value)] = value
        out[name] = row
    return out


def one_segment(features: Features, row_len: int) -> Features:
    """An unpacked row in the packed layout: one segment, positions 0.., then padding."""
    n = len(next(iter(features.values())))
    out = pad_features(features, row_len)
    out["segment_ids"] = (np.arange(row_len) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(row_len) < n, np.arange(row_len), 0).astype(np.int32)
    return out
