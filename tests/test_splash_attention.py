"""Splash attention (the Pallas TPU kernel; Pallas interpret mode on this CPU) against XLA attention
over a mask built here in numpy: causal, GQA and MQA, packed segments, right padding, gradients,
sharded over a mesh; and compiled for a TPU slice as the real kernel."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax.model.attention import attend
from persllm_jax.model.block_attention import NO_WINDOW
from persllm_jax.model.sharding import make_mesh
from persllm_jax.model.splash import padded_length, splash_attention
from tests.attention_inputs import inputs as _inputs
from tests.attention_inputs import packed_segments as _segments
from tests.attention_inputs import placed_like_activations as _placed_like_activations
from tests.attention_inputs import reference_mask as _reference_mask

FWD_TOL = 1e-5  # fp32 outputs
GRAD_TOL = 1e-5  # fp32 gradients, relative to the largest gradient entry


def _compare(q, k, v, segments, window=None, window_size=0):
    """`window`: the layer's window (None: a global layer), handed to the kernel traced, as the
    layer scan hands it; `window_size`: the model's."""
    real = segments > 0
    mask = jnp.asarray(_reference_mask(segments, window))
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * real[:, :, None, None], jnp.float32)
    traced = jnp.int32(NO_WINDOW if window is None else window)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * weights).sum()

    def xla(q, k, v):
        return attend(q, k, v, mask, "xla")

    def splash(q, k, v):
        return splash_attention(q, k, v, jnp.asarray(segments), window=traced, window_size=window_size)

    ref, out = xla(q, k, v), jax.jit(splash)(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=FWD_TOL, rtol=0)
    ref_grads = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        scale = float(np.abs(np.asarray(r)).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=GRAD_TOL * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("local", [True, False], ids=["local-layer", "global-layer"])
def test_a_model_with_a_sliding_window_runs_each_layer_with_its_mask(local):
    """A window of 40 over packed rows of 256: the local kernel where the layer is local, the
    causal one where it is global, chosen from the traced window."""
    q, key, v = _inputs(2, 256, 4, 2, 16, seed=9)
    segments = _segments(2, 256, seed=9, most=3)
    _compare(q, key, v, segments, window=40 if local else None, window_size=40)


@pytest.mark.parametrize(
    "n, k, t",
    [(4, 4, 128), (4, 2, 200), (4, 1, 96), (2, 2, 640)],
    ids=["mha", "gqa-padded-length", "mqa", "two-blocks"],
)
def test_causal_with_right_padding_equals_xla(n, k, t):
    q, key, v = _inputs(2, t, n, k, 16)
    lengths = np.asarray([t, t // 2 + 3])
    segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    _compare(q, key, v, segments)


def test_packed_segments_equal_xla_and_never_attend_across():
    q, key, v = _inputs(3, 256, 4, 2, 32, seed=2)
    segments = _segments(3, 256, seed=2)
    assert (segments.max(axis=1) >= 2).any(), "the test needs at least one packed row"
    _compare(q, key, v, segments)
    # A change confined to one segment's keys and values leaves every other segment's output alone.
    row, first = 0, segments[0] == 1
    out = np.asarray(splash_attention(q, key, v, jnp.asarray(segments)))
    bumped_k = key.at[row, np.flatnonzero(first)].add(3.0)
    bumped_v = v.at[row, np.flatnonzero(first)].add(3.0)
    changed = np.asarray(splash_attention(q, bumped_k, bumped_v, jnp.asarray(segments)))
    others = segments[row] != 1
    np.testing.assert_array_equal(changed[row, others], out[row, others])
    assert np.abs(changed[row, first] - out[row, first]).max() > 1e-3


@pytest.mark.parametrize("mesh_shape, kv_heads", [((2, 2, 2), 2), ((1, 4, 2), 1), ((1, 8, 1), 2)])
def test_sharded_over_a_mesh_equals_xla(mesh_shape, kv_heads):
    """shard_map over batch (data x fsdp) and heads (tensor); MQA with tensor 2 copies the one
    key/value head to each shard."""
    mesh = make_mesh(*mesh_shape)
    q, key, v = _inputs(8, 128, 4, kv_heads, 16, seed=3)
    segments = _segments(8, 128, seed=3)
    with jax.set_mesh(mesh):
        q, key, v = (jax.device_put(x, _placed_like_activations(x, mesh)) for x in (q, key, v))
        _compare(q, key, v, segments)


def test_padded_length_is_a_whole_number_of_blocks():
    assert [padded_length(t) for t in (1, 128, 129, 512, 513, 3000, 4096)] == [
        128, 128, 256, 512, 1024, 3072, 4096,
    ]  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_compiles_as_the_tpu_kernel_for_a_v5e_slice(monkeypatch):
    """Lowered for TPU, the forward and the fused backward are Mosaic custom calls, not the
    interpreter's loops; the tensor axis shards heads without gathering them."""
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = make_mesh(1, 2, 2, devices=list(devices))
    b, t, n, k, h = 4, 1024, 8, 2, 128
    heads = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=heads)
    kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16, sharding=heads)
    segments = jax.ShapeDtypeStruct(
        (b, t), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    )

    def loss(q, k, v, s):
        return splash_attention(q, k, v, s).astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, segments).compile().as_text()
    assert text.count("tpu_custom_call") == 2
    assert "all-gather" not in text
