"""What SFT and DPO tasks share: sources -> examples, the data order, per-host batch assembly,
metric slices by persona and stage, and the data position saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax.data import mixture, pipeline
from persllm_jax.data.readers import count_records, read_records
from persllm_jax.train import distributed
from persllm_jax.train.config import DataSource, RunConfig

log = logging.getLogger(__name__)


PairKey = Callable[[Any], tuple[Hashable, int] | None]


def load_shards(
    sources: Sequence[DataSource],
    convert: Callable[[dict], Any],
    batch_size: int,
    held: set[int],
    seed: int,
    strict_split: bool = False,
    pair_key: PairKey | None = None,
) -> tuple[list[list[tuple[tuple[int, int], Any]]], list[int], list[np.ndarray], dict]:
    """Each source's records that batch rows `held` read (see `pipeline.row_of_records`),
    converted, as ((source, _index), example) pairs; how many records each source has over all
    processes (a training source with none is an error); the row of each record position; and
    {(source, _index): its partner's} for the examples that train with a partner.
    `strict_split` drops records that name no split (held-out data must be marked so).
    `pair_key(example)` = (key, side) or None: of a source's examples, one of side 0 and one of
    side 1 with the same key (and no third) are partners, read by one row (the first one's); every
    process then reads and converts every record to find them."""
    loaded, row_of, partners = [], [], {}
    for number, source in enumerate(sources):
        split = source.split or None
        rows = pipeline.row_of_records(count_records(source.path, split), batch_size, seed)
        keep = None if pair_key else (lambda i, rows=rows: int(rows[i]) in held)
        records = read_records(source.path, split=split, keep=keep)
        if strict_split:
            records = [r for r in records if r.get("split") == split]
        pairs = [((number, record["_index"]), convert(record)) for record in records]
        if pair_key:
            rows = rows.copy()
            found: dict[Hashable, list[tuple[int, tuple[int, int]]]] = {}
            for key, example in pairs:
                keyed = pair_key(example)
                if keyed is not None:
                    found.setdefault(keyed[0], []).append((keyed[1], key))
            unpaired = 0
            for members in found.values():
                if sorted(side for side, _ in members) == [0, 1]:
                    (_, a), (_, b) = sorted(members, key=lambda m: m[1])
                    partners[a], partners[b] = b, a
                    rows[b[1]] = rows[a[1]]
                else:
                    unpaired += len(members)
            if unpaired:
                log.warning(
                    "%s: %d records have no partner to train with (no mirror, or more than one record "
                    "with the same prompt and answers); each trains alone",
                    source.path,
                    unpaired,
                )
            pairs = [(key, example) for key, example in pairs if int(rows[key[1]]) in held]
        loaded.append(pairs)
        row_of.append(rows)
    totals = [sum(counts) for counts in zip(*distributed.allgather_json([len(s) for s in loaded]))]
    return loaded, totals, row_of, partners


def row_units(source: Sequence[tuple[tuple[int, int], Any]], partners: dict) -> tuple[tuple[int, ...], ...]:
    """A row's examples of one source as units of training, in source order: each example
    alone, or with its partner (`load_shards`), which the same row reads."""
    position = {key: n for n, (key, _) in enumerate(source)}
    return tuple(
        (n,) if key not in partners else (n, position[partners[key]])
        for n, (key, _) in enumerate(source)
        if key not in partners or n < position[partners[key]]
    )


def eval_sources(cfg: RunConfig) -> tuple[tuple[DataSource, ...], bool]:
    """The held-out sources and whether their split is strict: `eval.sources`, or by default
    the records of the training sources marked `split: test`."""
    if cfg.eval.sources:
        return cfg.eval.sources, False
    return tuple(dataclasses.replace(s, split="test", repeats=1.0) for s in cfg.data.sources), True


# Where an example was read from (file, line) and the id derived from it when a record has none
# say nothing about what is trained on: moving the data must not change the fingerprint.
_NOT_CONTENT = ("id", "origin")


def example_digest(example) -> str:
    """A hash of what an example trains on (not where it was read from)."""
    content = [getattr(example, f.name) for f in dataclasses.fields(example) if f.name not in _NOT_CONTENT]
    return hashlib.sha256(repr(content).encode()).hexdigest()[:16]


def fingerprint(local: list[list[tuple[tuple[int, int], Any]]], extra: dict) -> str:
    """A hash of every process's examples (with their places) and the settings that fix the data
    order (checked on resume, and part of the reference cache's key). Each process hashes only the
    examples it read; the digests are exchanged, so every process gets the same fingerprint."""
    mine = {f"{key[0]}:{key[1]}": example_digest(example) for source in local for key, example in source}
    everything: dict[str, str] = {}
    for part in distributed.allgather_json(mine):
        everything.update(part)
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(everything.items())).encode())
    return digest.hexdigest()[:16]


class GroupNames:
    """Persona, stage and pair-source names (of every process's examples) -> small integer ids
    for metric slices (-1 = none)."""

    def __init__(self, examples: list[list[Any]]):
        mine = [
            sorted({getattr(e, field, None) for s in examples for e in s} - {None, ""})
            for field in ("persona", "stage", "pair_source")
        ]
        gathered = distributed.allgather_json(mine)
        self.personas, self.stages, self.pair_sources = (
            sorted({name for part in gathered for name in part[k]}) for k in range(3)
        )

    def ids(self, example) -> tuple[int, int]:
        persona = self.personas.index(example.persona) if example.persona in self.personas else -1
        stage = self.stages.index(example.stage) if example.stage in self.stages else -1
        return persona, stage

    def source_id(self, example) -> int:
        source = getattr(example, "pair_source", None)
        return self.pair_sources.index(source) if source in self.pair_sources else -1


def segment_sums(values_B, ids_B, num_groups: int):
    """Per-group sums of a [B] array; rows with id -1 count in no group."""
    if num_groups == 0:
        return jax.numpy.zeros((0,), values_B.dtype)
    return jax.ops.segment_sum(values_B, jax.numpy.where(ids_B < 0, num_groups, ids_B), num_groups + 1)[:-1]


def sliced_means(prefix: str, sums: np.ndarray, counts: np.ndarray, names: list[str], kind: str) -> dict:
    return {f"{prefix}/{kind}={name}": float(s / c) for name, s, c in zip(names, sums, counts) if c > 0}


class TaskData:
    """A task's examples (this process's shards), metric groups, row streams and fingerprint,
    from `data.sources` (see data/pipeline.py for which rows read what)."""

    def __init__(
        self,
        cfg: RunConfig,
        convert: Callable[[dict], Any],
        mesh,
        held_out: bool = False,
        pair_key: PairKey | None = None,
    ):
        """`held_out`: the evaluation sources instead (`eval_sources`), read once per evaluation.
        `pair_key`: partners train together, as one unit (see `load_shards`)."""
        self.cfg = cfg
        batch = cfg.train.batch_size
        self.rows = process_rows(batch_sharding(mesh), batch)
        held = set(self.rows.tolist())
        sources, strict = eval_sources(cfg) if held_out else (cfg.data.sources, False)
        if not sources:
            raise ValueError("data.sources is empty: give at least one {path, repeats, split}")
        local, self.totals, row_of, partners = load_shards(
            sources, convert, batch, held, cfg.data.shuffle_seed, strict, pair_key
        )
        for source, total in zip(sources, self.totals):
            if not total and not held_out:
                raise ValueError(f"data source {source.path} has no records for split {source.split!r}")
        if held_out and not sum(self.totals):
            raise ValueError(
                "eval.every_steps is set but there is nothing to evaluate on: no record of "
                f"{[s.path for s in sources]} is marked split {sources[0].split!r}; give eval.sources"
            )
        self.records_read = sum(len(s) for s in local)
        self.examples = [[example for _, example in source] for source in local]
        self.groups = GroupNames(self.examples)
        self.repeats = [s.repeats for s in sources]
        self.shards = {}
        for row in self.rows:
            examples = tuple(
                tuple(item for item in source if row_of[item[0][0]][item[0][1]] == row) for source in local
            )
            units = None if pair_key is None else tuple(row_units(s, partners) for s in examples)
            self.shards[int(row)] = pipeline.RowShard(int(row), examples, units)
        for row, shard in self.shards.items():
            if not held_out and not any(len(s) * r for s, r in zip(shard.examples, self.repeats)):
                raise ValueError(
                    f"batch row {row} has no examples: the sources hold {self.totals} records, each "
                    f"read by one of {batch} rows; lower train.batch_size well below the number of records"
                )
        # partners change which row reads what: another data order
        extra = {"seq_len": cfg.train.seq_len, "repeats": self.repeats}
        self.fingerprint = fingerprint(local, extra | ({"partners": True} if pair_key else {}))
        log.info(
            "process %d read %d of %d %srecords (the shards of its %d batch rows)",
            jax.process_index(), self.records_read, sum(self.totals), "held-out " if held_out else "",
            len(self.rows),
        )  # fmt: skip

    def orders(self) -> dict[int, mixture.Mixture]:
        return {
            row: shard.mixture(self.repeats, self.cfg.data.shuffle_seed) for row, shard in self.shards.items()
        }

    def host_rows(
        self, features, names, options: pipeline.PipelineOptions, pad, combine=None
    ) -> pipeline.HostRows:
        """This process's row streams over `features(key, example)` (see data/pipeline.py);
        `combine` joins the features of a unit's examples into one element."""
        orders = self.orders()
        return pipeline.HostRows(
            {
                row: pipeline.row_dataset(shard, orders[row], features, names, options, pad, combine)
                for row, shard in self.shards.items()
            }
        )

    def position(self, step: int) -> dict:
        return data_position(step, self.cfg, self.fingerprint)

    def check_resume(self, saved: dict) -> None:
        check_resume(saved, self.cfg, self.fingerprint)


def one_pass_rows(datasets: Sequence, empty: dict):
    """Stacked host rows of one pass over every row's dataset (`pipeline.one_pass`); a row that is
    done gets `empty` (no segment, nothing trained) until the rows of every process are done."""
    iterators = [iter(ds) for ds in datasets]
    while True:
        parts = [next(it, None) for it in iterators]
        if not any(distributed.allgather_json(any(p is not None for p in parts))):
            return
        yield {k: np.stack([empty[k] if p is None else p[k] for p in parts]) for k in empty}


def pipeline_options(cfg: RunConfig, row_len: int) -> pipeline.PipelineOptions:
    return pipeline.PipelineOptions(
        row_len=row_len,
        packing=cfg.train.packing,
        packing_bins=cfg.train.packing_bins,
        max_segments=cfg.train.max_segments,
        threads=cfg.data.workers,
        seed=cfg.data.shuffle_seed,
    )


def batch_sharding(mesh) -> NamedSharding:
    """Batch rows split over data x fsdp; replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def process_rows(
    sharding: NamedSharding, batch_size: int, process: int | None = None, process_of=lambda d: d.process_index
) -> np.ndarray:
    """The global batch rows that `process`'s devices hold (ascending), so that is what it loads.

    Read from the sharding, not assumed from the process index: when the tensor axis spans
    processes, the processes holding replicas of one batch shard load the same rows."""
    process = jax.process_index() if process is None else process
    held: set[int] = set()
    for device, index in sharding.devices_indices_map((batch_size,)).items():
        if process_of(device) == process:
            held.update(range(batch_size)[index[0]])
    return np.asarray(sorted(held), np.int64)


def to_global(local_tree, sharding: NamedSharding, rows: np.ndarray, batch_size: int):
    """Rows `rows` of the global batch, loaded by this process -> global arrays sharded over the
    batch axis; each device takes its own rows out of them."""
    position = {int(row): i for i, row in enumerate(rows)}

    def place(x):
        x = np.asarray(x)

        def shard(index):
            return x[[position[row] for row in range(batch_size)[index[0]]]]

        return jax.make_array_from_callback((batch_size, *x.shape[1:]), sharding, shard)

    return jax.tree.map(place, local_tree)


def data_position(step: int, cfg: RunConfig, data_fingerprint: str) -> dict:
    return {
        "step": step,
        "batches_consumed": step,
        "batch_size": cfg.train.batch_size,
        "shuffle_seed": cfg.data.shuffle_seed,
        "data_fingerprint": data_fingerprint,
        "packing": cfg.train.packing,
        "packing_bins": cfg.train.packing_bins,
        "max_segments": cfg.train.max_segments,
    }


def check_resume(saved: dict, cfg: RunConfig, data_fingerprint: str) -> None:
    """Resuming with another batch size, seed or data would silently skip or repeat examples."""
    expected = data_position(saved.get("step", 0), cfg, data_fingerprint)
    for key in ("batch_size", "shuffle_seed", "data_fingerprint", "packing", "packing_bins", "max_segments"):
        if saved.get(key) != expected[key]:
            raise ValueError(
                f"cannot resume: the checkpoint was written with {key}={saved.get(key)!r} but the "
                f"config now gives {expected[key]!r}; use a new run_dir or restore the setting"
            )
