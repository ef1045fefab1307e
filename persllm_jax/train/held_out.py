"""Evaluation during training: the task's own loss and metrics over the held-out data, one pass.

The held-out rows are made exactly as training rows (packed or not, the same features), each
process passing over its rows' shards of `eval` sources; the step's loss function runs without
gradients and its sums are added over the pass, so `eval/loss` is the mean over every held-out
trained token (SFT) or pair (DPO), and the slices are exact. Records go to metrics.jsonl under
`eval/...` with the number of updates made so far as their step (0: before any).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax.train.tasks import common

log = logging.getLogger(__name__)

# Metrics of a training step that mean nothing without an update, or only per batch.
_TRAINING_ONLY = ("grad_norm", "learning_rate", "tokens", "packing_efficiency")


class HeldOut:
    def __init__(self, task, graphdef, mesh):
        self.task, self.mesh = task, mesh
        loss_fn = task.loss_fn

        @jax.jit
        def sums(params, batch, frozen):
            total, count, metric_sums = loss_fn(nnx.merge(graphdef, params), batch, frozen)
            return {"total": total, "count": count, **metric_sums}

        self._sums = sums

    def run(self, params) -> dict:
        """`eval/<metric>` over the held-out data with these parameters."""
        task = self.task
        data, batch_size = task.eval_data, task.cfg.train.batch_size
        sharding = common.batch_sharding(self.mesh)
        totals = None
        for rows in common.one_pass_rows(task.eval_datasets(), task.empty_row()):
            batch = common.to_global(task.rows_batch(rows), sharding, data.rows, batch_size)
            out = self._sums(params, batch, task.frozen)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        values = {k: np.asarray(v) for k, v in jax.device_get(totals).items()}
        count = float(values["count"])
        values["loss"] = float(values["total"]) / count if count else math.nan
        values.update({name: math.nan for name in _TRAINING_ONLY})
        record = task.metrics_record(values)
        return {f"eval/{k}": v for k, v in record.items() if k not in _TRAINING_ONLY}
