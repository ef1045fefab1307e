"""A model's LoRA adapters as a PEFT adapter directory: `adapter_config.json` and
`adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, directory)` loads onto the
transformers base model.

PEFT names a projection's adapter after the base weight (`base_model.model.<module>.lora_A.weight`
[rank, in], `lora_B.weight` [out, rank]) and scales it by lora_alpha / r, as ours is scaled, so the
tensors are our lora_a and lora_b transposed, one per layer.

The rows of the tokens a run added (the stage tokens) go in as PEFT's trainable tokens
(`trainable_token_indices`; `<module>.token_adapter.trainable_tokens_delta` holds the rows' full
values, which PEFT writes over the base's rows): whatever the base's own rows for those ids are
after `resize_token_embeddings`, the loaded model has ours, trained or not. PEFT ties them to the
output rows when the embeddings are tied; an untied output head gets its rows the same way.
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
from persllm_jax.io.vocabulary import token_ids
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


def token_row_tensors(state: nnx.State, cfg: ModelConfig, token_ids) -> dict[str, np.ndarray]:
    """PEFT's trainable-token tensors of the rows `token_ids`: the embedding rows with their trained
    change, and the untied output head's rows."""
    if not token_ids:
        return {}
    flat = flat_variables(state)
    ids = np.asarray(token_ids, np.int64)
    rows = _host_array(flat[("embed",)].get_value())[ids].astype(np.float32)
    if ("token_rows",) in flat:
        delta = _host_array(flat[("token_rows",)].get_value()).astype(np.float32)
        trained = {row: i for i, row in enumerate(cfg.lora_token_rows)}
        for i, token_id in enumerate(token_ids):
            if token_id in trained:
                rows[i] += delta[trained[token_id]]
    names = {entry.path: entry.hf_name.removesuffix(".weight") for entry in key_map(cfg)}
    suffix = ".token_adapter.trainable_tokens_delta"
    dtype = np.asarray(flat[("embed",)].get_value()[:1]).dtype
    tensors = {f"base_model.model.{names[('embed',)]}{suffix}": rows.astype(dtype)}
    if ("lm_head",) in flat:  # [D, V]: torch's [V, D] rows are its columns
        head = _host_array(flat[("lm_head",)].get_value())[:, ids].T
        tensors[f"base_model.model.{names[('lm_head',)]}{suffix}"] = np.ascontiguousarray(head)
    return tensors


def _token_indices(cfg: ModelConfig, token_ids) -> list[int] | dict[str, list[int]] | None:
    if not token_ids:
        return None
    ids = [int(i) for i in token_ids]
    # a list targets the input embedding (tied to the output rows when the weights are tied)
    return ids if cfg.tie_word_embeddings else {"embed_tokens": ids, "lm_head": ids}


def adapter_config(cfg: ModelConfig, base_model: str, token_ids=()) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        # PEFT matches module names by suffix; the projection names are unique within a layer
        "target_modules": sorted({path.rsplit("/", 1)[1] for path in cfg.lora_paths()}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "trainable_token_indices": _token_indices(cfg, token_ids),
    }


def save_adapter(model, out_dir: str | Path, base_model: str, tokenizer=None, added_token_ids=()) -> Path:
    """Write the PEFT adapter directory of a model with adapters, with the rows of the tokens the
    run added to its base (`added_token_ids`, and the rows it trained). In a multi-process run
    every process must call this (the adapters are gathered); process 0 writes."""
    cfg = model.cfg
    if not cfg.lora_rank:
        raise ValueError("the model has no LoRA adapters to export")
    token_ids = sorted(set(added_token_ids) | set(cfg.lora_token_rows))
    tensors = dict(adapter_tensors(nnx.state(model, nnx.LoRAParam), cfg))
    tensors |= token_row_tensors(nnx.state(model), cfg, token_ids)
    out_dir = Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors_file.write(out_dir / ADAPTER_WEIGHTS, tensors)
    config = adapter_config(cfg, base_model, token_ids)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def added_token_ids(run_dir: Path, tokenizer) -> list[int]:
    """The ids of the tokens a LoRA run added to its base (its recipe's `add_tokens`)."""
    meta = run_dir / "persllm_model.json"
    base = json.loads(meta.read_text()).get("base") if meta.is_file() else None
    tokens = (base or {}).get("add_tokens") or ()
    return token_ids(tokenizer, tokens) if tokenizer is not None else []


def base_model_of(run_dir: Path) -> str:
    """The base model a run started from (its config's `model.path`, else its preset), as PEFT's
    `base_model_name_or_path`."""
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        return ""
    model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    return str(model.get("path") or model.get("preset") or "")
