"""What SFT and DPO tasks share: sources -> examples, the data order, per-host batch assembly,
metric slices by persona and stage, and the data position saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax.data import mixture
from persllm_jax.data.readers import read_records
from persllm_jax.train.config import DataSource, RunConfig


def load_sources(sources: Sequence[DataSource], convert: Callable[[dict], Any]) -> list[list[Any]]:
    """Every source read and converted; an empty source is an error naming it."""
    if not sources:
        raise ValueError("data.sources is empty: give at least one {path, repeats, split}")
    loaded = []
    for source in sources:
        records = read_records(source.path, split=source.split or None)
        if not records:
            raise ValueError(f"data source {source.path} has no records for split {source.split!r}")
        loaded.append([convert(record) for record in records])
    return loaded


# Where an example was read from (file, line) and the id derived from it when a record has none
# say nothing about what is trained on: moving the data must not change the fingerprint.
_NOT_CONTENT = ("id", "origin")


def fingerprint(examples: list[list[Any]], extra: dict) -> str:
    """A hash of the examples' content and the settings that fix the data order (checked on
    resume, and part of the reference cache's key)."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for source in examples:
        digest.update(b"\x00source")
        for example in source:
            content = [
                getattr(example, f.name) for f in dataclasses.fields(example) if f.name not in _NOT_CONTENT
            ]
            digest.update(repr(content).encode())
    return digest.hexdigest()[:16]


class GroupNames:
    """Persona and stage names -> small integer ids for metric slices (-1 = none)."""

    def __init__(self, examples: list[list[Any]]):
        self.personas = sorted({e.persona for s in examples for e in s if e.persona})
        self.stages = sorted({e.stage for s in examples for e in s if e.stage})

    def ids(self, example) -> tuple[int, int]:
        persona = self.personas.index(example.persona) if example.persona in self.personas else -1
        stage = self.stages.index(example.stage) if example.stage in self.stages else -1
        return persona, stage


def segment_sums(values_B, ids_B, num_groups: int):
    """Per-group sums of a [B] array; rows with id -1 count in no group."""
    if num_groups == 0:
        return jax.numpy.zeros((0,), values_B.dtype)
    return jax.ops.segment_sum(values_B, jax.numpy.where(ids_B < 0, num_groups, ids_B), num_groups + 1)[:-1]


def sliced_means(prefix: str, sums: np.ndarray, counts: np.ndarray, names: list[str], kind: str) -> dict:
    return {f"{prefix}/{kind}={name}": float(s / c) for name, s, c in zip(names, sums, counts) if c > 0}


class DataOrder:
    """Which examples each process loads at each step (see data/mixture.py): the rows of the
    global batch that its devices hold under the batch sharding."""

    def __init__(self, sizes: list[int], repeats: list[float], batch_size: int, seed: int, rows: np.ndarray):
        self.mixture = mixture.Mixture(tuple(sizes), tuple(repeats), seed)
        self.batch_size, self.rows = batch_size, rows

    def local_examples(self, step: int) -> list[tuple[int, int]]:
        return [(int(s), int(i)) for s, i in self.mixture.batch_rows(step, self.batch_size, self.rows)]


class TaskData:
    """A task's examples, metric groups, data order and fingerprint, from `data.sources`."""

    def __init__(self, cfg: RunConfig, convert: Callable[[dict], Any], mesh):
        self.cfg = cfg
        self.examples = load_sources(cfg.data.sources, convert)
        self.groups = GroupNames(self.examples)
        repeats = [s.repeats for s in cfg.data.sources]
        self.rows = process_rows(batch_sharding(mesh), cfg.train.batch_size)
        self.order = DataOrder(
            [len(s) for s in self.examples], repeats, cfg.train.batch_size, cfg.data.shuffle_seed, self.rows
        )
        self.fingerprint = fingerprint(self.examples, {"seq_len": cfg.train.seq_len, "repeats": repeats})

    def local_picks(self, step: int) -> list[tuple[tuple[int, int], Any]]:
        """((source, index), example) of the rows this process loads at `step`."""
        return [((s, i), self.examples[s][i]) for s, i in self.order.local_examples(step)]

    def group_ids(self, picks) -> np.ndarray:
        """[rows, 2] persona and stage ids of picked examples."""
        return np.asarray([self.groups.ids(e) for _, e in picks], np.int32).reshape(-1, 2)

    def position(self, step: int) -> dict:
        return data_position(step, self.cfg, self.fingerprint)

    def check_resume(self, saved: dict) -> None:
        check_resume(saved, self.cfg, self.fingerprint)


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
    }


def check_resume(saved: dict, cfg: RunConfig, data_fingerprint: str) -> None:
    """Resuming with another batch size, seed or data would silently skip or repeat examples."""
    expected = data_position(saved.get("step", 0), cfg, data_fingerprint)
    for key in ("batch_size", "shuffle_seed", "data_fingerprint"):
        if saved.get(key) != expected[key]:
            raise ValueError(
                f"cannot resume: the checkpoint was written with {key}={saved.get(key)!r} but the "
                f"config now gives {expected[key]!r}; use a new run_dir or restore the setting"
            )
