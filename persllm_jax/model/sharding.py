"""Logical axis names -> mesh axes: the rules table, mesh construction and sharding helpers.

Every parameter carries logical axis names (metadata `logical_axes`); activations are
constrained by name too. One table below maps names to the mesh axes `data`, `fsdp`, `tensor`.
Without an active mesh every constraint is a no-op, so the model runs unchanged on one device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence | None = None,
    *,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
) -> Mesh:
    """A (data, fsdp, tensor) mesh laid out on the physical network.

    `data`, `fsdp` and `tensor` are sizes within one slice (ICI); one of them may be -1 to take
    the devices the others leave. `dcn_data` / `dcn_fsdp` > 1 spread those axes over several
    slices joined by the data-center network, so the mesh axes are data x dcn_data and
    fsdp x dcn_fsdp long. A slice is a TPU slice (its devices' `slice_index`), or one process on
    platforms without slices (GPU hosts). Within a slice, devices are ordered by their position
    in the torus (`mesh_utils.create_device_mesh`), so neighbours on a mesh axis are neighbours
    on the chip network.
    """
    devices = list(devices if devices is not None else jax.devices())
    slices = dcn_data * dcn_fsdp
    if dcn_data < 1 or dcn_fsdp < 1 or len(devices) % slices:
        raise ValueError(
            f"mesh dcn_data={dcn_data} x dcn_fsdp={dcn_fsdp} slices do not divide {len(devices)} devices"
        )
    per_slice = len(devices) // slices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: only one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or per_slice % known:
        raise ValueError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} does not divide the {per_slice} devices "
            f"of {'each of the ' + str(slices) + ' slices' if slices > 1 else 'the job'}"
        )
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != per_slice:
        raise ValueError(
            f"mesh data x fsdp x tensor = {'x'.join(map(str, sizes))} = {math.prod(sizes)} "
            f"but {per_slice} devices are available{' per slice' if slices > 1 else ''}"
        )
    if slices == 1:
        device_grid = _physical_grid(sizes, devices)
    else:
        device_grid = mesh_utils.create_hybrid_device_mesh(
            sizes,
            [dcn_data, dcn_fsdp, 1],
            devices,
            process_is_granule=getattr(devices[0], "slice_index", None) is None or _one_slice(devices),
            allow_split_physical_axes=True,
        )
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _one_slice(devices) -> bool:
    return len({getattr(d, "slice_index", 0) for d in devices}) == 1


def _physical_grid(sizes: list[int], devices: list) -> np.ndarray:
    """Devices in torus order for the mesh shape; the given order where no layout is known
    (a subset of a slice's chips, for example)."""
    try:
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as err:
        log.warning("no physical layout for mesh %s (%s); devices kept in the order given", sizes, err)
        return np.asarray(devices).reshape(sizes)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for logical names; a dimension the mesh axes do not divide stays replicated."""
    spec, used = [], set()
    for i, name in enumerate(logical_axes):
        target = LOGICAL_RULES.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                size = math.prod(mesh.shape[a] for a in axes)
                if shape[i] % size:
                    log.debug(
                        "dim %d (%s) of size %d not divisible by %s; replicated", i, name, shape[i], axes
                    )
                    axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_logical_axes(variable: nnx.Variable, ndim: int) -> tuple:
    """A variable's logical axes; stacked layer parameters get a leading 'layers' axis."""
    axes = tuple(variable.get_metadata().get("logical_axes", ()))
    if len(axes) == ndim - 1:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        raise ValueError(f"logical axes {axes} do not match a parameter of rank {ndim}")
    return axes


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every leaf of an (abstract) model state, from its logical axes."""

    def to_sharding(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        axes = param_logical_axes(variable, len(value.shape))
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh)))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def active_mesh():
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x, logical_axes: Sequence[str | None]):
    """Sharding constraint by logical names; does nothing when no mesh is active."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def over_batch_and_heads(per_device: Callable, q_BTNH, k_BTKH, v_BTKH, segment_BT, *replicated):
    """`per_device(q, k, v, segment, *replicated)` on each device's shards under the active mesh (`shard_map`:
    batch over data x fsdp, heads over tensor), or on the whole arrays without one. Attention
    kernels that loop over blocks or call Pallas run per shard, so they never see the mesh. When
    the tensor axis has more shards than there are key/value heads, each shard gets copies of the
    key/value heads its query heads use. `replicated` arrays (a layer's window) reach every shard whole."""
    n, kv = q_BTNH.shape[2], k_BTKH.shape[2]
    mesh = active_mesh()
    if mesh is None:
        return per_device(q_BTNH, k_BTKH, v_BTKH, segment_BT, *replicated)
    batch = logical_to_spec(("batch",), q_BTNH.shape[:1], mesh)[0]
    heads = logical_to_spec(("act_heads",), (n,), mesh)[0]
    kv_heads = logical_to_spec(("act_heads",), (kv,), mesh)[0]
    if kv_heads != heads:
        k_BTKH, v_BTKH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BTKH, v_BTKH))
    qkv_spec = PartitionSpec(batch, None, heads, None)
    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(
            qkv_spec,
            qkv_spec,
            qkv_spec,
            PartitionSpec(batch, None),
            *(PartitionSpec() for _ in replicated),
        ),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return sharded(q_BTNH, k_BTKH, v_BTKH, segment_BT, *replicated)
