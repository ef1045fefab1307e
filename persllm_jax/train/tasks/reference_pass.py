"""The DPO reference pass: every pair's reference log-probs, once, before training.

Each batch row passes once over its own shard of the pairs (packed or not, as the train step
sees them); the values are gathered from every process, so each process can write or read the
whole cache (`reference_cache.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np

from persllm_jax.progress import Progress
from persllm_jax.train import distributed
from persllm_jax.train.tasks import common
from persllm_jax.train.tasks.reference_cache import SIDES, gather


def compute(
    params,
    data: common.TaskData,
    *,
    rows: Iterable[dict],
    to_batch: Callable,
    logps: Callable,
    sharding,
    batch_size: int,
) -> dict:
    """`{side: [array per source, by record position]}` (NaN where a position holds no pair).

    `rows` are this process's stacked rows of one pass; `to_batch(rows)` gives (batch, the
    (source, index) of each pair slot, -1 where empty); `logps(params, batch)` the chosen and
    rejected log-probs per slot."""
    jitted = jax.jit(logps)
    found: dict[str, list[float]] = {}
    with Progress(None, "reference log-probs", unit="rows", disable=jax.process_index() != 0) as bar:
        for host_rows in rows:
            batch, keys = to_batch(host_rows)
            values = jitted(params, common.to_global(batch, sharding, data.rows, batch_size))
            chosen, rejected = (gather(v).reshape(batch_size, -1)[data.rows] for v in values)
            for (s, i), c, r in zip(keys.reshape(-1, 2), chosen.reshape(-1), rejected.reshape(-1)):
                if s >= 0:
                    found[f"{s}:{i}"] = [float(c), float(r)]
            bar.update(batch_size)
    everything: dict[str, list[float]] = {}
    for part in distributed.allgather_json(found):
        everything.update(part)
    sizes = [0] * len(data.examples)
    for key in everything:
        s, i = map(int, key.split(":"))
        sizes[s] = max(sizes[s], i + 1)
    out = {side: [np.full(n, np.nan, np.float32) for n in sizes] for side in SIDES}
    for key, (c, r) in everything.items():
        s, i = map(int, key.split(":"))
        out["chosen"][s][i], out["rejected"][s][i] = c, r
    return out
