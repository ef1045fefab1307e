"""A model's LoRA adapters as a PEFT adapter directory: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, directory)` loads onto the
transformers base model.

PEFT names a projection's adapter after the base weight (`base_model.model.<module>.lora_A.weight`
[rank, in], `lora_B.weight` [out, rank]) and scales it by lora_alpha / r, as ours is scaled, so the
tensors are our lora_a and lora_b transposed, one per layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from persllm_jax.io import safetensors_file
from persllm_jax.io.hf_weights import _host_array, flat_variables, key_map
from persllm_jax.model.config import ModelConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_tensors(state: nnx.State, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, tensor) for every adapter matrix, layer by layer."""
    flat = flat_variables(state)
    for entry in key_map(cfg):
        module = entry.path[:-1]
        if entry.path[-1] != "kernel" or module + ("lora", "lora_a") not in flat:
            continue
        a = _host_array(flat[module + ("lora", "lora_a")].get_value())  # [layers, in, rank]
        b = _host_array(flat[module + ("lora", "lora_b")].get_value())  # [layers, rank, out]
        stem = "base_model.model." + entry.hf_name.removesuffix(".weight")
        for layer in range(cfg.num_layers):
            name = stem.format(layer=layer)
            yield f"{name}.lora_A.weight", np.ascontiguousarray(a[layer].T)
            yield f"{name}.lora_B.weight", np.ascontiguousarray(b[layer].T)


def adapter_config(cfg: ModelConfig, base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        # PEFT matches module names by suffix; the projection names are unique within a layer
        "target_modules": sorted({path.rsplit("/", 1)[1] for path in cfg.lora_paths()}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(model, out_dir: str | Path, base_model: str, tokenizer=None) -> Path:
    """Write the PEFT adapter directory of a model with adapters. In a multi-process run every
    process must call this (the adapters are gathered); process 0 writes."""
    cfg = model.cfg
    if not cfg.lora_rank:
        raise ValueError("the model has no LoRA adapters to export")
    tensors = dict(adapter_tensors(nnx.state(model, nnx.LoRAParam), cfg))
    out_dir = Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors_file.write(out_dir / ADAPTER_WEIGHTS, tensors)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, base_model), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def base_model_of(run_dir: Path) -> str:
    """The base model a run started from (its config's `model.path`, else its preset), as PEFT's
    `base_model_name_or_path`."""
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        return ""
    model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    return str(model.get("path") or model.get("preset") or "")
