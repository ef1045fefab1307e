"""Where the train state lives: every parameter and both AdamW moments take the parameter's sharding
from the rules table (not XLA's propagation, which leaves the moments replicated), so under fsdp x
tensor one device holds about 1 / (fsdp x tensor) of the state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax.io.pretrained import state_shardings_for
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import abstract_model, init_model
from persllm_jax.model.sharding import make_mesh
from persllm_jax.train.config import OptimSection
from persllm_jax.train.optimizer import make_optimizer
from persllm_jax.train.state import init_state, state_shardings

# Every dimension is divisible by each mesh axis it is sharded over, so nothing falls back to
# replication except the norms and the step counters.
CFG = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    num_layers=2,
    tie_word_embeddings=False,
)

# The rules table written out by hand for this model: parameter -> mesh axis of each dimension.
EXPECTED = {
    (1, 8, 1): {
        "embed": (None, "fsdp"),
        "lm_head": ("fsdp", None),
        "final_norm.weight": (None,),
        "attn.q_proj.kernel": (None, "fsdp", None),
        "attn.k_proj.kernel": (None, "fsdp", None),
        "attn.v_proj.kernel": (None, "fsdp", None),
        "attn.o_proj.kernel": (None, None, "fsdp"),
        "mlp.gate_proj.kernel": (None, "fsdp", None),
        "mlp.up_proj.kernel": (None, "fsdp", None),
        "mlp.down_proj.kernel": (None, None, "fsdp"),
        "input_norm.weight": (None, None),
        "post_attn_norm.weight": (None, None),
    },
    (2, 2, 2): {
        "embed": ("tensor", "fsdp"),
        "lm_head": ("fsdp", "tensor"),
        "final_norm.weight": (None,),
        "attn.q_proj.kernel": (None, "fsdp", "tensor"),
        "attn.k_proj.kernel": (None, "fsdp", "tensor"),
        "attn.v_proj.kernel": (None, "fsdp", "tensor"),
        "attn.o_proj.kernel": (None, "tensor", "fsdp"),
        "mlp.gate_proj.kernel": (None, "fsdp", "tensor"),
        "mlp.up_proj.kernel": (None, "fsdp", "tensor"),
        "mlp.down_proj.kernel": (None, "tensor", "fsdp"),
        "input_norm.weight": (None, None),
        "post_attn_norm.weight": (None, None),
    },
}


def _name(path) -> str:
    """'layers.attn.q_proj.kernel' style name of a parameter leaf path, without 'layers' and 'value'."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return ".".join(str(k) for k in keys if k not in ("layers", "value"))


def _spec(sharding: NamedSharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return tuple(s[0] if isinstance(s, tuple) and len(s) == 1 else s for s in spec)


def _sharded_state(mesh_shape):
    mesh = make_mesh(*mesh_shape)
    _, abstract_params = nnx.split(abstract_model(CFG))
    params_shardings = state_shardings_for(abstract_params, mesh)
    optimizer = make_optimizer(OptimSection(), 10)
    shardings, _ = state_shardings(optimizer, abstract_params, params_shardings, mesh)
    _, params = nnx.split(init_model(CFG))
    params = jax.device_put(params, params_shardings)
    state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=shardings)(params)
    return mesh, state


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_every_parameter_and_moment_has_its_rules_table_sharding(mesh_shape):
    mesh, state = _sharded_state(mesh_shape)
    expected = EXPECTED[mesh_shape]
    adams = [
        s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    ]
    assert len(adams) == 1, adams
    adam, checked = adams[0], []
    for tree_name, tree in (("params", state.params), ("mu", adam.mu), ("nu", adam.nu)):
        names = set()
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = _name(path)
            names.add(name)
            assert _spec(leaf.sharding, leaf.ndim) == expected[name], (tree_name, name, leaf.sharding.spec)
            checked.append((tree_name, name))
        assert names == set(expected), (tree_name, names ^ set(expected))
    assert len(checked) == 3 * len(expected)
    # what is not a parameter's mirror (the step, Adam's count) is a replicated scalar
    assert state.step.sharding.is_fully_replicated and adam.count.sharding.is_fully_replicated


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_one_device_holds_its_shards_only(mesh_shape):
    mesh, state = _sharded_state(mesh_shape)
    device = mesh.devices.flat[0]
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    on_device = expected_bytes = total = 0
    for leaf in jax.tree.leaves(state):
        on_device += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
        # the shard size from the spec alone: each sharded dimension divided by its axis size
        split = math.prod(sizes[a] for a in _spec(leaf.sharding, leaf.ndim) if a is not None)
        expected_bytes += leaf.nbytes // split
        total += leaf.nbytes
    assert on_device == expected_bytes
    model_split = sizes["fsdp"] * sizes["tensor"]
    assert abs(on_device / (total / model_split) - 1) < 0.10, (on_device, total, model_split)
    # before the moments followed their parameters, one device held both moments whole
    params_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    assert on_device < params_bytes


def test_a_step_keeps_the_state_where_it_was():
    """The compiled step's outputs keep the declared shardings (the gradients are constrained to the
    parameters' shardings, so the update never gathers a whole moment)."""
    from persllm_jax.losses import token_logps
    from persllm_jax.train.step import make_train_step

    mesh, state = _sharded_state((2, 2, 2))
    graphdef, _ = nnx.split(abstract_model(CFG))
    optimizer = make_optimizer(OptimSection(), 10)

    def loss_fn(model, batch, frozen):
        hidden = model.hidden_states(batch)
        logps = token_logps(hidden[:, :-1], model.output_kernel(), batch[:, 1:], chunk_size=8)
        return -logps.sum(), jnp.asarray(logps.size, jnp.float32), {}

    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
        make_train_step(graphdef, loss_fn, optimizer, lambda s: 0.0, grad_shardings=shardings.params),
        out_shardings=(shardings, None),
    )
    batch = jax.device_put(
        np.arange(4 * 16).reshape(4, 16) % CFG.vocab_size,
        NamedSharding(mesh, PartitionSpec(("data", "fsdp"))),
    )
    with jax.set_mesh(mesh):
        new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
        assert new.sharding.is_equivalent_to(old.sharding, old.ndim)
