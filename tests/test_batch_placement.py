"""Which batch rows each process loads, read from the batch sharding, against a count made here
from the mesh's device grid; and per-process rows placed into global arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from persllm_jax.model.sharding import make_mesh
from persllm_jax.train.tasks.common import batch_sharding, process_rows, to_global

PROCESS_LAYOUTS = {
    "blocked": lambda d: d.id // 4,  # two hosts of 4 devices, as jax.devices() orders them
    "interleaved": lambda d: d.id % 2,  # every tensor group of the mesh spans both hosts
}


def _expected_rows(mesh, batch_size: int, process: int, process_of) -> list[int]:
    """Rows block (i, j) of the [data, fsdp] grid go to every process owning a device there."""
    data, fsdp, _ = mesh.devices.shape
    per_block = batch_size // (data * fsdp)
    rows = []
    for i in range(data):
        for j in range(fsdp):
            if any(process_of(d) == process for d in mesh.devices[i, j, :]):
                block = i * fsdp + j
                rows.extend(range(block * per_block, (block + 1) * per_block))
    return sorted(rows)


@pytest.mark.parametrize("layout", sorted(PROCESS_LAYOUTS))
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)])
def test_each_process_loads_the_rows_its_devices_hold(mesh_shape, layout):
    mesh, process_of, batch_size = make_mesh(*mesh_shape), PROCESS_LAYOUTS[layout], 16
    held = [process_rows(batch_sharding(mesh), batch_size, p, process_of).tolist() for p in (0, 1)]
    for p in (0, 1):
        assert held[p] == _expected_rows(mesh, batch_size, p, process_of)
        assert held[p], "every process holds some rows"
    assert sorted(set(held[0]) | set(held[1])) == list(range(batch_size))
    if mesh_shape[2] == 8 or (layout == "interleaved" and mesh_shape[2] > 1):
        # the tensor axis spans both processes: each loads the same rows as its replica
        assert held[0] == held[1]


def test_rows_are_placed_on_the_devices_that_hold_them():
    mesh = make_mesh(2, 2, 2)
    sharding = batch_sharding(mesh)
    batch = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    rows = np.asarray([5, 0, 7, 2, 1, 6, 3, 4])  # the order rows are loaded in does not matter
    placed = to_global({"x": batch[rows]}, sharding, rows, 8)["x"]
    np.testing.assert_array_equal(np.asarray(placed), batch)
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[shard.index])
    assert placed.sharding == sharding and len(jax.devices()) == 8
