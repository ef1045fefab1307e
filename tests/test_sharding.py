"""The model on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax import load_pretrained
from persllm_jax.io.hf_weights import flat_variables
from persllm_jax.model.decoder import init_model
from persllm_jax.model.presets import tiny
from persllm_jax.model.sharding import LOGICAL_RULES, make_mesh, state_shardings
from tests import hf_fixtures

# Same weights, only the partitioning differs, so only the order of partial sums changes.
# At our own initialization scale (std 0.02, logits ~1) that is within 1e-5; the large-weight
# fixture (logits ~8, errors amplified through the layers) is held to the whole-model 1e-4.
TOLERANCE_DEFAULT_INIT = 1e-5
TOLERANCE_LARGE_WEIGHTS = 1e-4

# What the rules table gives for each parameter on a mesh where every axis has size 2.
EXPECTED_SPECS = {
    ("embed",): PartitionSpec("tensor", "fsdp"),
    ("lm_head",): PartitionSpec("fsdp", "tensor"),
    ("layers", "attn", "q_proj", "kernel"): PartitionSpec(None, "fsdp", "tensor"),
    ("layers", "attn", "k_proj", "kernel"): PartitionSpec(None, "fsdp", "tensor"),
    ("layers", "attn", "v_proj", "kernel"): PartitionSpec(None, "fsdp", "tensor"),
    ("layers", "attn", "o_proj", "kernel"): PartitionSpec(None, "tensor", "fsdp"),
    ("layers", "mlp", "gate_proj", "kernel"): PartitionSpec(None, "fsdp", "tensor"),
    ("layers", "mlp", "up_proj", "kernel"): PartitionSpec(None, "fsdp", "tensor"),
    ("layers", "mlp", "down_proj", "kernel"): PartitionSpec(None, "tensor", "fsdp"),
    ("layers", "input_norm", "weight"): PartitionSpec(None, None),
    ("layers", "post_attn_norm", "weight"): PartitionSpec(None, None),
    ("final_norm", "weight"): PartitionSpec(None),
}


def test_rules_table_is_short_and_uses_mesh_axes():
    for target in LOGICAL_RULES.values():
        for axis in (target,) if isinstance(target, str) else target or ():
            assert axis in ("data", "fsdp", "tensor")
    assert len(LOGICAL_RULES) <= 16


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("untied")
    hf_fixtures.save_tiny("llama_untied_mqa", directory)
    return directory


def test_sharded_forward_equals_single_device(untied_dir):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    single, _ = load_pretrained(untied_dir)
    sharded, _ = load_pretrained(untied_dir, mesh=mesh)

    flat = flat_variables(nnx.state(sharded))
    assert set(flat) == set(EXPECTED_SPECS)
    for path, variable in flat.items():
        sharding = variable.get_value().sharding
        assert isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape
        assert sharding.spec == EXPECTED_SPECS[path], path
        np.testing.assert_array_equal(
            np.asarray(variable.get_value()), np.asarray(flat_variables(nnx.state(single))[path].get_value())
        )

    ids = np.random.RandomState(0).randint(0, 320, (4, 32))
    expected = np.asarray(single(jnp.asarray(ids)))
    with jax.set_mesh(mesh):
        batch = jax.device_put(ids, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        logits = nnx.jit(lambda m, x: m(x))(sharded, batch)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOLERANCE_LARGE_WEIGHTS, rtol=0)


def _forward_on(model, ids, mesh):
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        batch = jax.device_put(ids, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        return np.asarray(nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, state), batch))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (1, 1, 8), (8, 1, 1)])
def test_default_init_sharded_forward_within_1e5(shape):
    model = init_model(
        tiny(vocab_size=320, num_layers=3, num_heads=8, num_kv_heads=8, tie_word_embeddings=False)
    )
    ids = np.random.RandomState(1).randint(0, 320, (8, 24))
    expected = np.asarray(model(jnp.asarray(ids)))
    sharded = _forward_on(model, ids, make_mesh(*shape))
    np.testing.assert_allclose(sharded, expected, atol=TOLERANCE_DEFAULT_INIT, rtol=0)


def test_mesh_fill_and_errors():
    assert dict(make_mesh(data=2, fsdp=-1, tensor=1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh(data=1, fsdp=1, tensor=-1).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    with pytest.raises(ValueError, match="does not divide the 8 devices of the job"):
        make_mesh(data=3, fsdp=-1, tensor=1)
    with pytest.raises(ValueError, match="dcn_data=3 x dcn_fsdp=1 slices do not divide 8 devices"):
        make_mesh(dcn_data=3)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        make_mesh(data=-1, fsdp=-1, tensor=1)
    with pytest.raises(ValueError, match="= 4 but 8 devices"):
        make_mesh(data=2, fsdp=2, tensor=1)


def _tpu_devices(monkeypatch, topology: str, slices: int = 1) -> list:
    pytest.importorskip("libtpu", reason="TPU topologies need libtpu")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    return list(
        topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=slices).devices
    )


def _ring_hops(group, torus=(4, 4, 4)) -> int:
    """The longest chip-to-chip step around a ring of devices on a wrapped torus."""

    def hops(a, b):
        return sum(min(abs(x - y), n - abs(x - y)) for x, y, n in zip(a.coords, b.coords, torus))

    return max(hops(group[i], group[(i + 1) % len(group)]) for i in range(len(group)))


@pytest.mark.parametrize("shape", [(1, 16, 4), (4, 4, 4)])
def test_mesh_axes_follow_the_torus(monkeypatch, shape):
    """On a v5p 4x4x4 cube, every ring of the tensor axis is one ICI hop per step; devices taken
    in the order the runtime lists them are not."""
    devices = _tpu_devices(monkeypatch, "v5p:4x4x4")
    mesh = make_mesh(*shape, devices=devices)
    rings = [mesh.devices[i, j] for i in range(shape[0]) for j in range(shape[1])]
    assert max(_ring_hops(r) for r in rings) == 1
    listed = np.asarray(devices).reshape(shape)
    assert max(_ring_hops(listed[i, j]) for i in range(shape[0]) for j in range(shape[1])) > 1


def test_hybrid_mesh_puts_slices_along_dcn_axes(monkeypatch):
    devices = _tpu_devices(monkeypatch, "v5e:2x2", slices=2)
    mesh = make_mesh(1, -1, 1, devices=devices, dcn_data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    mesh = make_mesh(1, 2, 2, devices=devices, dcn_fsdp=2)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    # each tensor group stays inside one slice; fsdp crosses the data-center network once
    assert all(len({d.slice_index for d in mesh.devices[0, j]}) == 1 for j in range(4))
    assert [mesh.devices[0, j, 0].slice_index for j in range(4)] == [0, 0, 1, 1]
