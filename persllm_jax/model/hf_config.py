"""A transformers config <-> a ModelConfig: which architectures and rope types we take, what each
family's config keys mean, and a refusal naming what we do not implement."""

from __future__ import annotations

from typing import Any

from persllm_jax.model.config import FULL, SLIDING, SUPPORTED_ROPE_TYPES, ModelConfig, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}


# transformers' model_type of each architecture (a config.json without `architectures` names it so).
_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral",
    "gemma3_text": "gemma3",
}
# The MLP activation each architecture's configs name, and the config key they name it by.
_ACTIVATIONS = {"gemma3": ("hidden_activation", "gelu_pytorch_tanh")}


def architecture_of(hf_config: Any) -> str:
    """Our architecture name for a transformers config, or a clear refusal."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    found = ", ".join(names) or f"model_type={model_type!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        + (" (Gemma 3's text model only)" if "Gemma3ForConditionalGeneration" in names else "")
    )


def _rope_from(params: dict | None, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling parameters or None for the default type) from transformers' rope parameters."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rope_type
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, (None if rope_type == "default" else params)


def _rope_fields(hf_config: Any, architecture: str) -> dict:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if architecture == "gemma3":  # one set of rope parameters per layer kind
        theta, scaling = _rope_from(params.get(FULL), 1_000_000.0)
        local_theta, local_scaling = _rope_from(params.get(SLIDING), 10_000.0)
        return dict(
            rope_theta=theta,
            rope_scaling=scaling,
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
        )
    if not params:  # configs written before rope_parameters existed
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    theta, scaling = _rope_from(params, 10000.0)
    # the other families rotate local layers as they rotate global ones
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=theta, local_rope_scaling=scaling)


def _layer_kinds(hf_config: Any, architecture: str, num_layers: int) -> dict:
    """layer_types and sliding_window as transformers' attention reads them for this family."""
    window = getattr(hf_config, "sliding_window", None)
    if architecture in ("qwen2", "qwen3") and not getattr(hf_config, "use_sliding_window", False):
        window = None
    if architecture == "llama" or window is None:
        return {}
    if architecture == "mistral":  # one window for every layer
        return dict(layer_types=(SLIDING,) * num_layers, sliding_window=int(window))
    kinds = tuple(getattr(hf_config, "layer_types", None) or ())
    return dict(layer_types=kinds, sliding_window=int(window)) if SLIDING in kinds else {}


def _check_supported_numerics(hf_config: Any, architecture: str) -> None:
    key, expected = _ACTIVATIONS.get(architecture, ("hidden_act", "silu"))
    act = getattr(hf_config, key, expected)
    if act != expected:
        raise UnsupportedModelError(
            f"{key} {act!r} is not supported for {architecture}; only {expected!r} is"
        )
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, key, None) is not None:
            raise UnsupportedModelError(
                f"{key}={getattr(hf_config, key)} is not supported (Gemma 2's soft caps)"
            )
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("use_bidirectional_attention=True (an encoder) is not supported")


def from_hf_config(hf_config: Any, **overrides) -> ModelConfig:
    """Translate a transformers `PretrainedConfig` into a ModelConfig, refusing what we lack."""
    architecture = architecture_of(hf_config)
    _check_supported_numerics(hf_config, architecture)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    fields = dict(
        architecture=architecture,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=architecture == "qwen2" or attention_bias,
        o_bias=architecture in ("llama", "qwen3", "gemma3") and attention_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=architecture in ("qwen3", "gemma3"),
        query_pre_attn_scalar=int(getattr(hf_config, "query_pre_attn_scalar", 0) or 0)
        if architecture == "gemma3"
        else 0.0,
        **_rope_fields(hf_config, architecture),
        **_layer_kinds(hf_config, architecture, hf_config.num_hidden_layers),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_HF_MODEL_TYPE = {ours: theirs for theirs, ours in _MODEL_TYPES.items()}


def _check_transformers_can_hold(cfg: ModelConfig) -> None:
    """Refuse a config whose architecture in transformers has no place for one of its features."""
    name, arch = _HF_CLASS[cfg.architecture], cfg.architecture
    if arch == "qwen2" and cfg.o_bias:
        raise UnsupportedModelError("Qwen2 has no output-projection bias; transformers cannot hold one")
    if arch == "mistral" and (cfg.qkv_bias or cfg.o_bias):
        raise UnsupportedModelError("Mistral has no attention biases; transformers cannot hold them")
    if arch in ("llama", "qwen3", "gemma3") and cfg.qkv_bias != cfg.o_bias:
        raise UnsupportedModelError(
            f"{name}'s attention_bias adds biases to q, k, v and o together; "
            f"got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
        )
    if cfg.qk_norm != (arch in ("qwen3", "gemma3")):
        raise UnsupportedModelError(
            f"{name} {'has' if not cfg.qk_norm else 'has no'} query/key norms; got qk_norm={cfg.qk_norm}"
        )
    if cfg.query_pre_attn_scalar and arch != "gemma3":
        raise UnsupportedModelError(f"{name} scales scores by head_dim ** -0.5; got query_pre_attn_scalar")
    if not cfg.has_sliding_layers:
        return
    if arch == "llama" or (arch == "mistral" and not all(cfg.sliding_layers)):
        raise UnsupportedModelError(f"{name} cannot hold these layer_types (sliding-window layers)")
    local_rope = (cfg.local_rope_theta, cfg.local_rope_scaling)
    if arch != "gemma3" and local_rope != (cfg.rope_theta, cfg.rope_scaling):
        raise UnsupportedModelError(f"{name} rotates local layers as global ones; got local rope parameters")


def _rope_dict(theta: float, scaling: dict | None) -> dict:
    return {"rope_type": "default", **(scaling or {}), "rope_theta": theta}


def to_hf_config(cfg: ModelConfig, base: dict | None = None):
    """A transformers config for `cfg`; `base` (the source config.json) keeps token ids etc."""
    import transformers

    _check_transformers_can_hold(cfg)
    data = dict(base or {})
    for key in (
        "rope_scaling",
        "rope_theta",
        "rope_local_base_freq",
        "quantization_config",
        "_name_or_path",
        "transformers_version",
        "layer_types",
        "sliding_window_pattern",
    ):
        data.pop(key, None)
    data.update(
        architectures=[_HF_CLASS[cfg.architecture]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=_rope_dict(cfg.rope_theta, cfg.rope_scaling),
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        dtype=cfg.param_dtype,
    )
    window = cfg.sliding_window if cfg.has_sliding_layers else None
    kinds = list(cfg.layer_types) if cfg.has_sliding_layers else [FULL] * cfg.num_layers
    if cfg.architecture == "gemma3":
        data.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=cfg.qkv_bias,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
            rope_parameters={
                FULL: _rope_dict(cfg.rope_theta, cfg.rope_scaling),
                SLIDING: _rope_dict(cfg.local_rope_theta, cfg.local_rope_scaling),
            },
            layer_types=kinds,
            sliding_window=window,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
        data.pop("hidden_act", None)
    else:
        data.update(hidden_act="silu")
    if cfg.architecture == "llama":
        data.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.architecture == "mistral":
        data.update(sliding_window=window)
    elif cfg.architecture in ("qwen2", "qwen3"):
        data.update(use_sliding_window=window is not None, sliding_window=window, layer_types=kinds)
        if cfg.architecture == "qwen3":
            data.update(attention_bias=cfg.qkv_bias)
    data.pop("model_type", None)
    return transformers.AutoConfig.for_model(_HF_MODEL_TYPE[cfg.architecture], **data)
