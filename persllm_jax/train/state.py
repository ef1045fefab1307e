"""The train state (step counter, parameters, optimizer state) and where each of its leaves lives
on the mesh: the shardings the train step is compiled with, and the abstract state that an Orbax
checkpoint is restored into."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # every parameter, the frozen ones included
    opt_state: optax.OptState  # of the trained parameters only


def trainable_filter(model_cfg) -> type:
    """Which parameters train: the LoRA adapters when the model has them, else every parameter."""
    return nnx.LoRAParam if model_cfg.lora_rank else nnx.Param


def trained(params: nnx.State, trainable) -> nnx.State:
    return nnx.split_state(params, trainable, ...)[0]


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, trainable=nnx.Param) -> TrainState:
    opt_state = optimizer.init(trained(params, trainable))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def state_shardings(
    optimizer, abstract_params: nnx.State, params_shardings: nnx.State, mesh, trainable=nnx.Param
):
    """Shardings of the whole train state, derived from the rules table rather than from XLA's
    propagation (which leaves optimizer state built by `optimizer.init` replicated): parameters by
    their logical axes, every optimizer leaf that mirrors a parameter (AdamW's moments, a masked
    transform's entries) by that parameter's sharding, every other leaf (step counts) replicated.
    Returns (shardings, abstract parameters carrying their shardings)."""
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    abstract_sharded = jax.tree.map(
        lambda v, s: v.replace(
            jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())
        ),
        abstract_params,
        params_shardings,
        is_leaf=is_var,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(optimizer.init, trained(abstract_sharded, trainable))
    shardings = TrainState(
        step=replicated,
        params=params_shardings,
        opt_state=mirror_param_shardings(opt_shapes, abstract_params, params_shardings, replicated),
    )
    return shardings, abstract_sharded


def mirror_param_shardings(tree, abstract_params: nnx.State, params_shardings: nnx.State, default):
    """A sharding for every leaf of `tree`: a leaf whose path ends with a parameter's path and whose
    shape is that parameter's takes the parameter's sharding; any other leaf gets `default`."""
    shapes = {path: leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    by_path = {
        path: (shapes[path], sharding)
        for path, sharding in jax.tree_util.tree_leaves_with_path(params_shardings)
    }

    def pick(path, leaf):
        for start in range(len(path)):
            found = by_path.get(tuple(path[start:]))
            if found is not None and tuple(found[0]) == tuple(leaf.shape):
                return found[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def abstract_state(optimizer, abstract_sharded_params, shardings, trainable=nnx.Param) -> TrainState:
    """The state's shapes, dtypes and shardings, without allocating it: the restore target."""
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer, trainable), abstract_sharded_params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
