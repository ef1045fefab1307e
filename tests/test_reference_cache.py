"""The DPO reference cache's weight fingerprint: exact past 2^24 elements, the same on any mesh,
computed where the shards are; and the cache key's settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax.model.sharding import make_mesh
from persllm_jax.train.tasks.reference_cache import tensor_digest, weights_fingerprint


def test_positions_past_2_to_the_24_count():
    """float32 cannot tell position 2^24 from 2^24 + 1; swapping the values there must still
    change the fingerprint."""
    n = 2**24 + 8
    a = np.zeros(n, np.float32)
    a[2**24], a[2**24 + 1] = 1.0, 2.0
    b = a.copy()
    b[2**24], b[2**24 + 1] = 2.0, 1.0
    assert weights_fingerprint({"w": jnp.asarray(a)}) != weights_fingerprint({"w": jnp.asarray(b)})


def test_every_bit_and_dtype_counts():
    x = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    y = x.copy()
    y.view(np.uint32)[5, 7] ^= 1  # one mantissa bit
    assert weights_fingerprint({"w": jnp.asarray(x)}) != weights_fingerprint({"w": jnp.asarray(y)})
    assert weights_fingerprint({"w": jnp.asarray(x)}) != weights_fingerprint(
        {"w": jnp.asarray(x, jnp.bfloat16)}
    )
    assert weights_fingerprint({"w": jnp.asarray(x)}) != weights_fingerprint({"v": jnp.asarray(x)})


def test_the_same_on_any_mesh_without_gathering():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 48)), jnp.bfloat16)
    one_device = np.asarray(tensor_digest(x))
    for shape, spec in (
        ((1, 8, 1), PartitionSpec("fsdp", None)),
        ((2, 2, 2), PartitionSpec("fsdp", "tensor")),
    ):
        mesh = make_mesh(*shape)
        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        np.testing.assert_array_equal(np.asarray(tensor_digest(sharded)), one_device)
        text = tensor_digest.lower(sharded).compile().as_text()
        assert "all-gather" not in text and "all-reduce" in text  # partial sums reduced, not tensors moved
