"""`load_pretrained` and `save_pretrained`: HF directories, GGUF files and our model directories.

Our model directory (what `persllm import-hf` writes):
    persllm_model.json   format marker, the ModelConfig, the source transformers config
    params/              Orbax checkpoint of the parameters
    tokenizer/           the tokenizer with its chat template
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from persllm_jax.io import hf_weights, run_paths
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import CausalLM, abstract_model
from persllm_jax.model.hf_config import architecture_of, from_hf_config, to_hf_config
from persllm_jax.model.sharding import state_shardings

log = logging.getLogger(__name__)

MODEL_DIR_MARKER = run_paths.MODEL_DIR_MARKER
MODEL_DIR_FORMAT = "persllm-jax-model/1"


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def state_shardings_for(abstract_state: nnx.State, mesh: Mesh | None) -> nnx.State:
    """Mesh shardings from the rules table, or everything on the first device without a mesh."""
    if mesh is not None:
        return state_shardings(abstract_state, mesh)
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda v: v.replace(device), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def assemble(cfg: ModelConfig, mesh: Mesh | None, make_state) -> CausalLM:
    """Build a model whose parameters `make_state(abstract_state, shardings)` materializes."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    state = make_state(abstract_state, state_shardings_for(abstract_state, mesh))
    model = nnx.merge(graphdef, state)
    log.info(
        "%s model: %.1fM parameters, %d layers, params %s, compute %s",
        cfg.architecture,
        count_params(model) / 1e6,
        cfg.num_layers,
        cfg.param_dtype,
        cfg.compute_dtype,
    )
    return model


def count_params(model: CausalLM) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def set_source_config(model: CausalLM, hf_config: dict | None) -> None:
    # Kept as JSON text: module attributes that are not Variables must be hashable.
    model.hf_config_json = json.dumps(hf_config or {}, sort_keys=True, default=str)


def source_config(model: CausalLM) -> dict:
    return json.loads(getattr(model, "hf_config_json", "{}") or "{}")


def set_generation_config(model: CausalLM, generation: dict | None) -> None:
    """The source's `generation_config.json` (its end-of-turn ids, sampling defaults), kept with
    the model so that generation stops where the model's authors say and export writes it back."""
    model.generation_config_json = json.dumps(generation or {}, sort_keys=True, default=str)


def generation_config(model: CausalLM) -> dict:
    return json.loads(getattr(model, "generation_config_json", "{}") or "{}")


def eos_token_ids(generation: dict) -> list[int]:
    """`eos_token_id` of a generation config, which may be one id or a list (Llama-3.1 lists
    `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`)."""
    value = generation.get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


# ---------------------------------------------------------------------------------------------
# Loading.


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if run_paths.run_model_paths(path) is not None:
        return "run"
    if (path / MODEL_DIR_MARKER).is_file():
        return "persllm"
    if (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise ValueError(
        f"{path} is neither a Hugging Face model directory (config.json), a .gguf file, "
        f"a persllm model directory ({MODEL_DIR_MARKER}) nor a training run with checkpoints"
    )


def load_pretrained(
    path: str | Path,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    quantize: str = "none",
    **model_options: Any,
) -> tuple[CausalLM, Any]:
    """Load a model and its tokenizer.

    Args:
      path: an HF model directory (safetensors, sharded or not), a `.gguf` file, a persllm model
        directory, or a training run directory (its latest checkpoint).
      dtype: parameter dtype (float32 or bfloat16).
      mesh: place each parameter directly into its shards on this mesh; None = first device.
      quantize: "int8" or "nf4" (a frozen QLoRA base, HF and GGUF sources only): the projection
        kernels are quantized as they load, one layer at a time, so the base is never whole on a
        device in `dtype`.
      **model_options: ModelConfig fields to override, e.g. compute_dtype="bfloat16", remat="full".

    Returns:
      (model, tokenizer); the tokenizer is None when the source has none.
    """
    path = Path(path)
    kind = detect_format(path)
    model_options = {"param_dtype": _dtype_name(dtype), **model_options}
    if quantize != "none" and kind in ("persllm", "run"):
        raise ValueError(
            f"{path} is a {kind} directory: it loads as it was saved; quantize it with "
            "model.lora.add_adapters(..., base_quantization=...)"
        )
    if kind == "persllm":
        return load_model_dir(path, mesh=mesh, **model_options)
    if kind == "run":
        run_dir, params_dir, tokenizer_dir = run_paths.run_model_paths(path)
        return load_model_dir(
            run_dir, mesh=mesh, params_dir=params_dir, tokenizer_dir=tokenizer_dir, **model_options
        )
    if kind == "gguf":
        hf_config, source, tokenizer = _read_gguf(path)
    else:
        raw = json.loads((path / "config.json").read_text())
        architecture_of(types.SimpleNamespace(**raw))  # refuse unsupported models before transformers
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(path)
        source = hf_weights.SafetensorsDir(path)
        tokenizer = _load_tokenizer(path)
    cfg = from_hf_config(hf_config, base_quantization=quantize, **model_options)
    model = assemble(
        cfg, mesh, lambda abstract, shardings: hf_weights.load_state(source, cfg, abstract, shardings)
    )
    set_source_config(model, hf_config.to_dict())
    generation_file = path / "generation_config.json" if kind != "gguf" else None
    if generation_file is not None and generation_file.is_file():
        set_generation_config(model, json.loads(generation_file.read_text()))
    return model, tokenizer


def read_model_config(path: str | Path, **model_options: Any) -> ModelConfig:
    """The ModelConfig `load_pretrained(path, **model_options)` would build, without reading weights."""
    path = Path(path)
    kind = detect_format(path)
    if kind in ("persllm", "run"):
        directory = path if kind == "persllm" else run_paths.run_model_paths(path)[0]
        return read_model_meta(directory)[0].replace(**model_options)
    import transformers

    if kind == "gguf":
        hf_config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    else:
        raw = json.loads((path / "config.json").read_text())
        architecture_of(types.SimpleNamespace(**raw))
        hf_config = transformers.AutoConfig.from_pretrained(path)
    return from_hf_config(hf_config, **model_options)


def _load_tokenizer(path: Path):
    import transformers

    if not any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        log.warning("%s has no tokenizer files; returning tokenizer=None", path)
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


def _read_gguf(path: Path):
    """Dequantize a GGUF file with transformers (PyTorch) and take its tensors."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(
            "loading .gguf files needs torch and gguf: pip install 'persllm-jax[gguf]'"
        ) from err
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    hf_config = hf_model.config
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    arrays = {name: t.detach().float().numpy() for name, t in hf_model.state_dict().items()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf_config, hf_weights.ArraysSource(arrays, str(path)), tokenizer


# ---------------------------------------------------------------------------------------------
# Our model directory.


def params_tree(model: CausalLM) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_model_dir(model: CausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write a persllm model directory (Orbax parameters + config + tokenizer)."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", params_tree(model), force=True)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir / "tokenizer")
        write_model_meta(out_dir, model.cfg, source_config(model), generation_config(model))
    return out_dir


def write_model_meta(
    out_dir: Path, cfg: ModelConfig, hf_config: dict, generation: dict | None = None, base: dict | None = None
) -> None:
    """`base`: for a run whose checkpoints hold only LoRA adapters, the recipe of its base model
    (see io/starting_model.py)."""
    # How a step ran (the attention kernel, remat) belongs to the hardware it ran on, not to the
    # model: a run trained with TPU splash attention loads with XLA attention on a GPU or CPU.
    cfg = cfg.replace(attention_impl=ModelConfig.attention_impl, remat=ModelConfig.remat)
    meta = {
        "format": MODEL_DIR_FORMAT,
        "model_config": cfg.to_dict(),
        "hf_config": hf_config,
        "generation_config": generation or {},
    }
    if base is not None:
        meta["base"] = base
    (out_dir / MODEL_DIR_MARKER).write_text(json.dumps(meta, indent=2, default=str))


def _read_meta(path: Path) -> dict:
    marker = path / MODEL_DIR_MARKER
    meta = json.loads(marker.read_text())
    if meta.get("format") != MODEL_DIR_FORMAT:
        raise ValueError(f"{marker}: format {meta.get('format')!r}, expected {MODEL_DIR_FORMAT!r}")
    return meta


def read_generation_config(path: Path) -> dict:
    """The generation config a model directory (or a run directory) keeps for its model."""
    return _read_meta(path).get("generation_config") or {}


def read_model_meta(path: Path) -> tuple[ModelConfig, dict]:
    meta = _read_meta(path)
    return ModelConfig.from_dict(meta["model_config"]), meta.get("hf_config") or {}


def restore_params(params_dir: Path, abstract_state: nnx.State, shardings: nnx.State) -> nnx.State:
    """Restore Orbax parameters straight into `shardings` (any mesh, any saved mesh)."""
    import orbax.checkpoint as ocp

    def target(variable, sharding):
        value = variable.get_value()
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.get_value())

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    abstract_tree = nnx.to_pure_dict(
        jax.tree.map(lambda v, s: v.replace(target(v, s)), abstract_state, shardings, is_leaf=is_var)
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(Path(params_dir).absolute(), abstract_tree)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state


def load_model_dir(
    path: Path,
    mesh: Mesh | None = None,
    params_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
    **model_options,
) -> tuple[CausalLM, Any]:
    """A persllm model directory, or a run directory with one checkpoint's `params_dir`."""
    meta = _read_meta(path)
    cfg = ModelConfig.from_dict(meta["model_config"]).replace(**model_options)
    params_dir = params_dir or path / "params"
    tokenizer_dir = tokenizer_dir or path / "tokenizer"
    base = meta.get("base")
    if base is not None:  # a LoRA run: its checkpoints hold only the adapters
        model = _lora_run_model(cfg, base, params_dir, mesh)
    else:
        model = assemble(
            cfg, mesh, lambda abstract, shardings: restore_params(params_dir, abstract, shardings)
        )
    set_source_config(model, meta.get("hf_config") or {})
    set_generation_config(model, meta.get("generation_config"))
    return model, _load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None


def _lora_run_model(cfg: ModelConfig, base: dict, params_dir: Path, mesh) -> CausalLM:
    """A LoRA run's model: its base built again from the recipe, its adapters from the checkpoint.
    A quantized base is built in the dtype the run quantized it from, whatever dtype is asked for,
    so that its codes are the run's."""
    from persllm_jax.io.starting_model import load_starting_model
    from persllm_jax.model.lora import add_adapters, merged_model

    if cfg.base_quantization != "none":
        cfg = cfg.replace(param_dtype=base.get("dtype") or cfg.param_dtype)
    recipe = {**base, "dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype, "remat": cfg.remat}
    recipe["attention_impl"] = cfg.attention_impl
    start, _ = load_starting_model(recipe, mesh, quantize=cfg.base_quantization)
    if start.cfg.lora_rank:
        start = merged_model(start)
    model = add_adapters(
        start, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, mesh=mesh, token_rows=cfg.lora_token_rows,
        base_quantization=cfg.base_quantization, dropout=cfg.lora_dropout,
    )  # fmt: skip
    if model.cfg != cfg:
        raise ValueError(f"{params_dir}: the base rebuilt from its recipe is not the model the run trained")
    adapters = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, restore_params(params_dir, adapters, state_shardings_for(adapters, mesh)))
    return model


# ---------------------------------------------------------------------------------------------
# Export to Hugging Face.


def save_pretrained(
    model: CausalLM,
    tokenizer,
    out_dir: str | Path,
    max_shard_bytes: int = hf_weights.SHARD_BYTES,
    dtype: str | None = None,
) -> Path:
    """Write an HF model directory that transformers loads with no missing or unexpected weights:
    config.json, generation_config.json, safetensors (sharded past 2 GB), tokenizer + chat template.
    `dtype` (default: the model's parameter dtype) is the dtype every tensor is written in; a QLoRA
    run's merged model holds float32 kernels beside its base's dtype. In a multi-process run every
    process must call this; process 0 writes."""
    import transformers

    out_dir = Path(out_dir)
    if model.cfg.lora_rank:  # the adapters folded into the weights: a plain transformers model
        from persllm_jax.model.lora import merged_model

        model = merged_model(model)
    cfg = model.cfg if dtype is None else model.cfg.replace(param_dtype=str(jnp.dtype(dtype)))
    base = source_config(model)
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, key, None)
            if base.get(key) is None and token_id is not None:
                base[key] = token_id
    hf_config = to_hf_config(cfg, base)
    tensors = hf_weights.hf_tensors(nnx.state(model, nnx.Param), cfg)
    if dtype is not None:
        tensors = ((name, tensor.astype(jnp.dtype(dtype))) for name, tensor in tensors)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in the gathers, write nothing
            pass
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_weights.write_safetensors(tensors, out_dir, max_shard_bytes)
    hf_config.save_pretrained(out_dir)
    generation = generation_config(model)
    if generation:  # the source's, as it came (eos ids, sampling defaults)
        transformers.GenerationConfig.from_dict(generation).save_pretrained(out_dir)
    else:
        transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
