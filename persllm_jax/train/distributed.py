"""The job's processes and devices: `jax.distributed.initialize` from the config or the usual
environment, and the device mesh from the `mesh` section."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from persllm_jax.model.sharding import make_mesh
from persllm_jax.train.config import DistributedSection, MeshSection

log = logging.getLogger(__name__)


def initialize(cfg: DistributedSection) -> None:
    """Join the job's processes when a coordinator is configured; a no-op for one process.

    Sources, first found wins: the config keys, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID. On TPU pods and SLURM / Open MPI clusters, where JAX finds the coordinator
    itself, set PERSLLM_DISTRIBUTED_AUTO=1 instead. Must run before anything touches a device.
    """
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    process_id = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    auto = os.environ.get("PERSLLM_DISTRIBUTED_AUTO") == "1"
    if not address and not auto:
        return
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU processes exchange collectives through gloo (tests, CPU clusters).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        if num_processes <= 0 or process_id < 0:
            raise ValueError(
                f"distributed.coordinator_address={address!r} needs num_processes and process_id "
                f"(config or JAX_NUM_PROCESSES / JAX_PROCESS_ID); got {num_processes} and {process_id}"
            )
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def build_mesh(cfg: MeshSection, devices: list | None = None):
    """The run's (data, fsdp, tensor) mesh over `devices` (default: every device of the job)."""
    return make_mesh(
        cfg.data, cfg.fsdp, cfg.tensor, devices=devices, dcn_data=cfg.dcn_data, dcn_fsdp=cfg.dcn_fsdp
    )


def allgather_json(value) -> list:
    """`value` (anything JSON can hold) from every process, in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, lengths)]
