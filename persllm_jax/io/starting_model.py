"""The model a training run starts from, built from its recipe (the run config's `model` section as
a mapping: `path` or `preset` and `seed`, `tokenizer`, `dtype`, `compute_dtype`, `remat`,
`attention_impl`, `add_tokens`). A LoRA run's checkpoints hold only its adapters, so loading the
run builds its base again from the recipe kept in `persllm_model.json`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
from flax import nnx

from persllm_jax.io import pretrained
from persllm_jax.io.vocabulary import add_special_tokens
from persllm_jax.model.decoder import CausalLM
from persllm_jax.model.presets import preset


def load_tokenizer(path: str):
    import transformers

    path_ = Path(path)
    if path_.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(path_.parent, gguf_file=path_.name)
    if (path_ / "tokenizer").is_dir():  # a persllm model directory or run directory
        path_ = path_ / "tokenizer"
    return transformers.AutoTokenizer.from_pretrained(path_)


def load_starting_model(recipe: Mapping, mesh, quantize: str = "none") -> tuple[CausalLM, object]:
    """A pretrained path, or a preset with random weights, with the recipe's tokens added.

    `quantize` (a QLoRA run's base): the projection kernels of a Hugging Face or GGUF path or of
    a preset are stored as codes from the start, quantized as they load; a persllm model or run
    directory loads as saved (`add_adapters` quantizes it)."""
    options = {k: recipe[k] for k in ("compute_dtype", "remat", "attention_impl")}
    path, preset_name, dtype = recipe.get("path", ""), recipe.get("preset", ""), recipe["dtype"]
    if path and preset_name:
        raise ValueError("set model.path or model.preset, not both")
    if path:
        if pretrained.detect_format(Path(path)) in ("persllm", "run"):
            quantize = "none"
        model, tokenizer = pretrained.load_pretrained(
            path, dtype=dtype, mesh=mesh, quantize=quantize, **options
        )
    elif preset_name:
        model_cfg = preset(preset_name, param_dtype=dtype, base_quantization=quantize, **options)
        seed = recipe.get("seed", 0)

        def random_state(abstract, shardings):
            make = lambda: nnx.split(CausalLM(model_cfg, rngs=nnx.Rngs(seed)))[1]  # noqa: E731
            return jax.jit(make, out_shardings=shardings)()

        model = pretrained.assemble(model_cfg, mesh, random_state)
        tokenizer = None
    else:
        raise ValueError("the config sets neither model.path nor model.preset")
    if recipe.get("tokenizer"):
        tokenizer = load_tokenizer(recipe["tokenizer"])
    if tokenizer is None:
        raise ValueError(f"no tokenizer: {path or preset_name} has none; set model.tokenizer")
    if recipe.get("add_tokens"):
        model = add_special_tokens(model, tokenizer, list(recipe["add_tokens"]), mesh=mesh)
    if len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model.cfg.vocab_size} embeddings"
        )
    return model, tokenizer


def portable_recipe(recipe: Mapping) -> dict:
    """The recipe with its files as absolute paths, so it still finds them from another directory."""
    out = dict(recipe)
    for key in ("path", "tokenizer"):
        if out.get(key):
            out[key] = str(Path(out[key]).absolute())
    out["add_tokens"] = list(out.get("add_tokens") or ())
    return out
