"""Hugging Face weights <-> our parameters: a declarative key map, sharded loading, export.

Loading never builds the whole model on one device: each parameter is created with
`jax.make_array_from_callback`, and the callback reads from the memory-mapped safetensors only
the slice (and, for stacked layer parameters, only the layers) that one device shard holds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from pathlib import Path
from typing import Protocol

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from persllm_jax.io import safetensors_file
from persllm_jax.model import quantization
from persllm_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3  # export shard size, as transformers' default max_shard_size "2GB"
# Tensors that checkpoints sometimes carry but that are not parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class WeightMismatchError(ValueError):
    """A checkpoint tensor that is missing, unexpected, or of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class KeyMapEntry:
    """One parameter: our state path, its transformers name, and whether torch stores it [out, in]."""

    path: tuple[str, ...]
    hf_name: str  # contains "{layer}" for stacked layer parameters
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name


def key_map(cfg: ModelConfig) -> list[KeyMapEntry]:
    """Every parameter of a model with config `cfg`, in transformers' naming."""
    entries = [KeyMapEntry(("embed",), "model.embed_tokens.weight")]
    layer = "model.layers.{layer}."
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        entries.append(
            KeyMapEntry(("layers", "attn", proj, "kernel"), f"{layer}self_attn.{proj}.weight", True)
        )
        has_bias = cfg.o_bias if proj == "o_proj" else cfg.qkv_bias
        if has_bias:
            entries.append(KeyMapEntry(("layers", "attn", proj, "bias"), f"{layer}self_attn.{proj}.bias"))
    if cfg.qk_norm:
        for norm in ("q_norm", "k_norm"):
            entries.append(KeyMapEntry(("layers", "attn", norm, "weight"), f"{layer}self_attn.{norm}.weight"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        entries.append(KeyMapEntry(("layers", "mlp", proj, "kernel"), f"{layer}mlp.{proj}.weight", True))
        if cfg.mlp_bias:
            entries.append(KeyMapEntry(("layers", "mlp", proj, "bias"), f"{layer}mlp.{proj}.bias"))
    entries.append(KeyMapEntry(("layers", "input_norm", "weight"), f"{layer}input_layernorm.weight"))
    if cfg.is_gemma:  # Gemma's post_attention_layernorm normalizes the attention output
        entries.append(
            KeyMapEntry(("layers", "attn_out_norm", "weight"), f"{layer}post_attention_layernorm.weight")
        )
        entries.append(
            KeyMapEntry(("layers", "post_attn_norm", "weight"), f"{layer}pre_feedforward_layernorm.weight")
        )
        entries.append(
            KeyMapEntry(("layers", "mlp_out_norm", "weight"), f"{layer}post_feedforward_layernorm.weight")
        )
    else:  # the Llama family's post_attention_layernorm is the MLP's input norm
        entries.append(
            KeyMapEntry(("layers", "post_attn_norm", "weight"), f"{layer}post_attention_layernorm.weight")
        )
    entries.append(KeyMapEntry(("final_norm", "weight"), "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        entries.append(KeyMapEntry(("lm_head",), "lm_head.weight", True))
    return entries


# ---------------------------------------------------------------------------------------------
# Where tensors come from.


class TensorSource(Protocol):
    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...
    def origin(self, name: str) -> str: ...


class SafetensorsDir:
    """The safetensors of an HF model directory, sharded (with an index) or single-file."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise WeightMismatchError(f"{index}: not a valid safetensors index ({err})") from err
            for filename in sorted(set(weight_map.values())):
                if not (self.directory / filename).is_file():
                    raise FileNotFoundError(
                        f"{self.directory / filename} is listed in {index} but does not exist"
                    )
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors file in {self.directory}")
            weight_map = {}
            for file in files:
                for name in safetensors_file.SafetensorsFile(file).keys():
                    weight_map[name] = file.name
        self._weight_map = weight_map
        self._files: dict[str, safetensors_file.SafetensorsFile] = {}

    def _file(self, name: str) -> safetensors_file.SafetensorsFile:
        filename = self._weight_map[name]
        if filename not in self._files:
            self._files[filename] = safetensors_file.SafetensorsFile(self.directory / filename)
        file = self._files[filename]
        if name not in file.keys():
            raise WeightMismatchError(f"tensor {name!r} is indexed in {file.path} but not stored there")
        return file

    def names(self) -> set[str]:
        return set(self._weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def origin(self, name: str) -> str:
        return str(self.directory / self._weight_map[name])


class ArraysSource:
    """Tensors already in memory (a state dict from transformers' GGUF loader)."""

    def __init__(self, arrays: dict[str, np.ndarray], description: str):
        self._arrays, self._description = arrays, description

    def names(self) -> set[str]:
        return set(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def origin(self, name: str) -> str:
        return self._description


# ---------------------------------------------------------------------------------------------
# Loading.


def flat_variables(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def _tensor_name(entry: KeyMapEntry, layer: int | None) -> str:
    return entry.hf_name.format(layer=layer) if entry.stacked else entry.hf_name


def check_source(source: TensorSource, cfg: ModelConfig, abstract_state: nnx.State) -> None:
    """Every expected tensor present with the expected shape; nothing unexpected left over."""
    expected: dict[str, tuple[int, ...]] = {}
    flat = flat_variables(abstract_state)
    for entry in key_map(cfg):
        shape = tuple(flat[_stored_path(entry, flat)].get_value().shape)  # codes: the kernel's shape
        per_tensor = shape[1:] if entry.stacked else shape
        if entry.transpose:
            per_tensor = per_tensor[::-1]
        for layer in range(cfg.num_layers) if entry.stacked else [None]:
            expected[_tensor_name(entry, layer)] = per_tensor
    available = source.names()
    missing = sorted(set(expected) - available)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightMismatchError(f"missing tensors for a {cfg.architecture} model: {shown}")
    for name, shape in expected.items():
        found = source.shape(name)
        if found != shape:
            raise WeightMismatchError(
                f"tensor {name!r} in {source.origin(name)} has shape {list(found)}, "
                f"expected {list(shape)} from the model config"
            )
    unexpected = sorted(n for n in available - set(expected) if not _IGNORED.match(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if unexpected:
        raise WeightMismatchError(
            f"unexpected tensors {unexpected[:5]} in {source.origin(unexpected[0])}: "
            "the config does not describe them"
        )


def _read(source: TensorSource, entry: KeyMapEntry, layer, index, dtype) -> np.ndarray:
    tensor = source.get(_tensor_name(entry, layer))
    if entry.transpose:
        tensor = tensor.T
    return np.asarray(tensor[index], dtype=dtype)


def load_state(
    source: TensorSource, cfg: ModelConfig, abstract_state: nnx.State, shardings: nnx.State
) -> nnx.State:
    """Materialize every parameter directly into its shards (`shardings`: NamedSharding leaves).

    A model config with `base_quantization` (QLoRA) gets its projection kernels quantized as they
    load, one layer at a time: no full-precision stacked kernel is ever whole on a device."""
    check_source(source, cfg, abstract_state)
    flat, flat_shardings = flat_variables(abstract_state), flat_variables(shardings)
    for entry in key_map(cfg):
        if _stored_path(entry, flat) != entry.path:
            flat.update(_load_quantized(source, entry, cfg, flat, flat_shardings))
            continue
        variable = flat[entry.path]
        aval = variable.get_value()
        dtype = _numpy_dtype(aval.dtype)

        def shard(index, entry=entry, dtype=dtype, shape=aval.shape):
            if not entry.stacked:
                return _read(source, entry, None, index, dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([_read(source, entry, layer, index[1:], dtype) for layer in layers])

        array = jax.make_array_from_callback(aval.shape, flat_shardings[entry.path].get_value(), shard)
        flat[entry.path] = variable.replace(array)
    return nnx.from_flat_state(flat)


def _numpy_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == jax.numpy.bfloat16 else np.dtype(dtype)


def _stored_path(entry: KeyMapEntry, flat: dict) -> tuple[str, ...]:
    """Where `entry` lives in the state: its own path, or a quantized kernel's codes."""
    if entry.path in flat:
        return entry.path
    return entry.path[:-1] + ("kernel_codes",)


def _layer_sharding(sharding):
    """The sharding of one layer of a stacked parameter (the leading layers axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return sharding


def _load_quantized(source: TensorSource, entry: KeyMapEntry, cfg: ModelConfig, flat, flat_shardings) -> dict:
    """The codes and scales of one stacked projection kernel, read and quantized layer by layer
    into arrays that are written in place (donated), so the device holds the codes, one layer's
    kernel in `cfg.param_dtype` and that layer's codes at most."""
    module = entry.path[:-1]
    paths = (module + ("kernel_codes",), module + ("kernel_scale",))
    avals = [flat[p].get_value() for p in paths]
    placed = tuple(flat_shardings[p].get_value() for p in paths)
    layer_shape = avals[0].shape[1:]
    layer_sharding = _layer_sharding(placed[0])
    dtype = _numpy_dtype(jax.numpy.dtype(cfg.param_dtype))
    qtype = cfg.base_quantization

    @functools.partial(jax.jit, out_shardings=placed)
    def empty():
        return tuple(jax.numpy.zeros(a.shape, a.dtype) for a in avals)

    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=placed)
    def put(codes, scale, kernel, layer):
        layer_codes, layer_scale = quantization.quantize(kernel, qtype)
        return codes.at[layer].set(layer_codes), scale.at[layer].set(layer_scale)

    codes, scale = empty()
    for layer in range(avals[0].shape[0]):
        kernel = jax.make_array_from_callback(
            layer_shape, layer_sharding, lambda index, layer=layer: _read(source, entry, layer, index, dtype)
        )
        codes, scale = put(codes, scale, kernel, layer)
        del kernel
    return {paths[0]: flat[paths[0]].replace(codes), paths[1]: flat[paths[1]].replace(scale)}


# ---------------------------------------------------------------------------------------------
# Export.


def _host_array(array: jax.Array) -> np.ndarray:
    if not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(array)


def hf_tensors(state: nnx.State, cfg: ModelConfig):
    """Yield (transformers name, numpy tensor) for every parameter, one layer at a time."""
    flat = flat_variables(state)
    for entry in key_map(cfg):
        full = _host_array(flat[entry.path].get_value())
        for layer in range(cfg.num_layers) if entry.stacked else [None]:
            tensor = full[layer] if entry.stacked else full
            yield _tensor_name(entry, layer), np.ascontiguousarray(tensor.T if entry.transpose else tensor)


def write_safetensors(tensors, out_dir: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write tensors in shards of at most `shard_bytes`, each written as soon as it is full,
    with an index when there is more than one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str]]] = []
    weight_sizes: dict[str, int] = {}
    pending: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        path = out_dir / f"model-part-{len(written) + 1:05d}.safetensors"
        safetensors_file.write(path, pending)
        written.append((path, list(pending)))

    for name, tensor in tensors:
        if pending and size + tensor.nbytes > shard_bytes:
            flush()
            pending, size = {}, 0
        pending[name] = tensor
        weight_sizes[name] = tensor.nbytes
        size += tensor.nbytes
    flush()
    if len(written) == 1:
        written[0][0].replace(out_dir / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, (path, tensor_names) in enumerate(written, start=1):
        filename = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.replace(out_dir / filename)
        names.append(filename)
        weight_map.update({name: filename for name in tensor_names})
    index = {"metadata": {"total_size": sum(weight_sizes.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names
