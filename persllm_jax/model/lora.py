"""Low-rank adapters on a model: add them to a loaded base, switch them off, merge them into the
base weights.

The adapters are Flax's `nnx.LoRA` modules inside `Linear` (see layers.py), their parameters
`nnx.LoRAParam` (a kind of `nnx.Param`), so `nnx.state(model, nnx.LoRAParam)` is exactly what LoRA
training updates. Adapters off means lora_b = 0, which makes every adapted projection's output
exactly the base projection's: the base model is the adapters-off model, with no second copy of
its weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from persllm_jax.model import quantization
from persllm_jax.model.config import DEFAULT_LORA_TARGETS, ModelConfig
from persllm_jax.model.decoder import CausalLM, abstract_model
from persllm_jax.model.sharding import active_mesh, state_shardings

_A, _B = "lora_a", "lora_b"
_ROWS = "token_rows"  # the trained change of some embedding rows (CausalLM.token_rows)
# What a loaded model carries besides its parameters (io/pretrained.py): the source's HF config and
# generation config, as JSON text.
_CARRIED = ("hf_config_json", "generation_config_json")


def _flat(state: nnx.State) -> dict[tuple, nnx.Variable]:
    return {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}


def add_adapters(
    model: CausalLM,
    rank: int,
    alpha: float = 16.0,
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    seed: int = 0,
    mesh=None,
    token_rows: tuple[int, ...] = (),
    base_quantization: str = "none",
    dropout: float = 0.0,
) -> CausalLM:
    """`model` (no adapters) with fresh adapters: lora_a random, lora_b zero, each placed by its
    logical axes on `mesh` (default: the active mesh) like the base parameters, and a zero change
    of the embedding rows `token_rows`, trained with them. The base parameters are shared, not
    copied; with `base_quantization` (QLoRA) the projection kernels are replaced by their codes.
    `dropout`: the fraction of the adapters' input dropped in a training step."""
    if model.cfg.lora_rank:
        raise ValueError("the model already has adapters")
    loaded_as = model.cfg.base_quantization  # a base quantized as it loaded keeps its codes
    if loaded_as not in ("none", base_quantization):
        raise ValueError(f"the base was loaded quantized as {loaded_as}, not {base_quantization}")
    cfg = model.cfg.replace(
        lora_rank=rank,
        lora_alpha=alpha,
        lora_targets=tuple(targets),
        lora_dropout=dropout,
        lora_token_rows=tuple(token_rows),
        base_quantization=base_quantization,
    )
    graphdef, abstract = nnx.split(abstract_model(cfg))
    abstract_adapters = nnx.state(nnx.merge(graphdef, abstract), nnx.LoRAParam)

    def fresh():  # the whole model is built inside jit; all but the adapters is dead code
        return nnx.state(CausalLM(cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    mesh = mesh if mesh is not None else active_mesh()
    if mesh is None:
        adapters = jax.jit(fresh)()
    else:
        adapters = jax.jit(fresh, out_shardings=state_shardings(abstract_adapters, mesh))()
    flat = _flat(nnx.state(model))
    flat.update(_flat(adapters))
    if base_quantization != "none" and loaded_as == "none":
        placed = None if mesh is None else _flat(state_shardings(abstract, mesh))
        flat.update(_quantized_kernels(flat, _flat(abstract), base_quantization, placed))
    state = nnx.from_flat_state([(path, flat[path]) for path in _flat(abstract)])
    return _carry(model, nnx.merge(graphdef, state))


def _quantized_kernels(flat: dict, abstract: dict, qtype: str, placed: dict | None) -> dict:
    """The codes and scales of every projection kernel in `flat`, on their shardings in `placed`
    (flat shardings of the abstract state; None: the default device)."""
    out = {}
    for path in [p for p in abstract if p[-1] == "kernel_codes"]:
        module = path[:-1]
        codes, scale = abstract[path], abstract[module + ("kernel_scale",)]
        fn = functools.partial(quantization.quantize_stacked, qtype=qtype)
        if placed is None:
            fn = jax.jit(fn)
        else:
            paths = (path, module + ("kernel_scale",))
            fn = jax.jit(fn, out_shardings=tuple(placed[p].get_value() for p in paths))
        codes_value, scale_value = fn(flat[module + ("kernel",)].get_value())
        out[path] = codes.replace(codes_value)
        out[module + ("kernel_scale",)] = scale.replace(scale_value)
    return out


def adapters_off(state: nnx.State) -> nnx.State:
    """The same state with every lora_b and the embedding rows' change zero: the base model's
    outputs, exactly."""
    flat = _flat(state)
    for path, variable in flat.items():
        if path[-1] in (_B, _ROWS):
            flat[path] = variable.replace(jnp.zeros_like(variable.get_value()))
    return nnx.from_flat_state(list(flat.items()))


def merged_state(state: nnx.State, cfg: ModelConfig) -> tuple[nnx.State, ModelConfig]:
    """The adapters folded into the base kernels, W + scale * A B, and the rows' change into the
    embedding (in fp32, stored in the weight's dtype; a quantized base's kernels in fp32), and the
    adapters removed: a plain model of the returned config (lora_rank 0)."""
    flat = _flat(state)
    for path in [p for p in flat if p[-1] == "kernel_codes"]:  # a quantized base: dequantized, and
        # kept in float32 (the codes and the adapters' change are both exact there)
        module = path[:-1]
        codes, scale = flat.pop(path), flat.pop(module + ("kernel_scale",))
        value = quantization.dequantize(
            codes.get_value(), scale.get_value(), cfg.base_quantization, jnp.float32
        )
        flat[module + ("kernel",)] = nnx.Param(value, **codes.get_metadata())
    if (_ROWS,) in flat:
        delta = flat.pop((_ROWS,)).get_value().astype(jnp.float32)
        embed = flat[("embed",)]
        value = embed.get_value()
        rows = jnp.asarray(cfg.lora_token_rows, jnp.int32)
        flat[("embed",)] = embed.replace(value.astype(jnp.float32).at[rows].add(delta).astype(value.dtype))
    for path in [p for p in flat if p[-1] == _A]:
        module = path[:-2]  # (..., "q_proj", "lora", "lora_a")
        a = flat.pop(path).get_value().astype(jnp.float32)
        b = flat.pop(module + ("lora", _B)).get_value().astype(jnp.float32)
        kernel = flat[module + ("kernel",)]
        delta = cfg.lora_scale * jnp.einsum("...ir,...ro->...io", a, b)
        value = kernel.get_value()
        flat[module + ("kernel",)] = kernel.replace((value.astype(jnp.float32) + delta).astype(value.dtype))
    plain = cfg.replace(lora_rank=0, lora_dropout=0.0, lora_token_rows=(), base_quantization="none")
    return nnx.from_flat_state(list(flat.items())), plain


def merged_model(model: CausalLM) -> CausalLM:
    """A plain model (no adapters) whose outputs are `model`'s: for export and serving."""
    state, cfg = merged_state(nnx.state(model), model.cfg)
    graphdef, _ = nnx.split(abstract_model(cfg))
    return _carry(model, nnx.merge(graphdef, state))


def _carry(source: CausalLM, target: CausalLM) -> CausalLM:
    for key in _CARRIED:
        if hasattr(source, key):
            setattr(target, key, getattr(source, key))
    return target
