"""The decoder's own configuration, its presets, and conversion to and from Hugging Face configs."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
# Layer kinds of `ModelConfig.layer_types`, as transformers names them.
FULL, SLIDING = "full_attention", "sliding_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("none", "int8", "nf4")  # of a LoRA run's frozen base (model/quantization.py)
# The projections of every decoder layer, by the path LoRA targets are matched against.
PROJECTIONS = tuple(f"layers/attn/{p}_proj" for p in "qkvo") + tuple(
    f"layers/mlp/{p}_proj" for p in ("gate", "up", "down")
)
DEFAULT_LORA_TARGETS = (r"attn/(q|k|v|o)_proj", r"mlp/(gate|up|down)_proj")


class UnsupportedModelError(ValueError):
    """A checkpoint or config asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder of the Llama family (Llama, Qwen2, Qwen3, Mistral) or Gemma 3.

    Gemma 3 (architecture "gemma3") differs in ways the architecture implies: embeddings scaled by
    sqrt(hidden_size), RMSNorm weights stored as w in (1 + w), norms after attention and after the
    MLP as well as before them, and a GeGLU MLP (tanh-approximated GELU)."""

    architecture: str = "llama"  # "llama" | "qwen2" | "qwen3" | "mistral" | "gemma3"
    vocab_size: int = 49152
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Extra rope parameters as transformers names them (rope_type, factor, ...); None = default.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3, Gemma 3: an RMSNorm over each head's queries and keys (weights [head_dim]) before rotary.
    qk_norm: bool = False
    # Scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 3); 0 = head_dim ** -0.5.
    query_pre_attn_scalar: int = 0
    # Sliding-window (local) attention: the kind of each layer, FULL or SLIDING (empty: all FULL);
    # a SLIDING layer's query reads the keys fewer than `sliding_window` tokens before it, with
    # rotary tables of its own (local_rope_theta, local_rope_scaling).
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0
    local_rope_theta: float = 10000.0
    local_rope_scaling: dict | None = None
    # Numerics and memory: parameters stay in param_dtype, matmuls run in compute_dtype.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" | "dots"
    attention_impl: str = "xla"  # "xla" | "cudnn" (GPU flash attention) | "splash" (TPU Pallas kernel)
    # Low-rank adapters: y = x W + (lora_alpha / lora_rank) x A B on every projection whose path
    # (PROJECTIONS) a regular expression of lora_targets matches (re.search); rank 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # The fraction of each adapter's input dropped in a training step (the base path never drops).
    lora_dropout: float = 0.0
    # Vocabulary rows trained alongside the adapters (the stage tokens a run adds, which start
    # untrained): a learned change of those embedding rows, also the output rows when tied.
    lora_token_rows: tuple[int, ...] = ()
    # QLoRA: the frozen projection kernels stored as int8 or NF4 codes ("none": as param_dtype).
    base_quantization: str = "none"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        for name, value, allowed in (
            ("param_dtype", self.param_dtype, DTYPES),
            ("compute_dtype", self.compute_dtype, DTYPES),
            ("remat", self.remat, REMAT_POLICIES),
            ("attention_impl", self.attention_impl, ATTENTION_IMPLS),
        ):
            if value not in allowed:
                raise ValueError(f"model {name}={value!r}; valid values: {', '.join(allowed)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora rank {self.lora_rank} must be >= 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora dropout {self.lora_dropout} must be in [0, 1)")
        if self.base_quantization not in QUANTIZATIONS:
            raise ValueError(
                f"base quantization {self.base_quantization!r}; valid values: {', '.join(QUANTIZATIONS)}"
            )
        if self.lora_token_rows and not self.lora_rank:
            raise ValueError("lora token rows are trained with the adapters: they need lora rank > 0")
        if any(not 0 <= row < self.vocab_size for row in self.lora_token_rows):
            raise ValueError(
                f"lora token rows {list(self.lora_token_rows)} are not all below vocab {self.vocab_size}"
            )
        if self.lora_rank and not self.lora_paths():
            raise ValueError(
                f"lora targets {list(self.lora_targets)} match no projection; the projections are "
                + ", ".join(PROJECTIONS)
            )
        for scaling in (self.rope_scaling, self.local_rope_scaling):
            rope_type = (scaling or {}).get("rope_type", "default")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - {FULL, SLIDING})
        if unknown:
            raise UnsupportedModelError(
                f"layer types {unknown} are not supported; supported: {FULL}, {SLIDING}"
            )
        if self.has_sliding_layers and self.sliding_window <= 0:
            raise ValueError(f"{SLIDING} layers need sliding_window > 0, got {self.sliding_window}")
        if self.has_sliding_layers and self.attention_impl == "cudnn":
            raise ValueError(
                f"attention_impl={self.attention_impl!r} does not run sliding-window layers yet; "
                "set model.attention_impl=xla (or splash on a TPU) for this model"
            )

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Whether each layer is a sliding-window one."""
        return tuple(t == SLIDING for t in self.layer_types) or (False,) * self.num_layers

    @property
    def is_gemma(self) -> bool:
        return self.architecture == "gemma3"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def lora_paths(self) -> tuple[str, ...]:
        """The projections that carry adapters."""
        if not self.lora_rank:
            return ()
        try:
            patterns = [re.compile(t) for t in self.lora_targets]
        except re.error as err:
            raise ValueError(f"lora target {err.pattern!r} is not a regular expression: {err}") from err
        return tuple(p for p in PROJECTIONS if any(pattern.search(p) for pattern in patterns))

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def __hash__(self):  # rope_scaling is a dict; the model stores its config as static data
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(valid)}")
        for key in ("lora_targets", "lora_token_rows", "layer_types"):  # lists in JSON and YAML
            if key in data:
                data = {**data, key: tuple(data[key])}
        return cls(**data)

    @property
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        norms = (4 if self.is_gemma else 2) * d + (2 * hd if self.qk_norm else 0)
        per_layer = attn + mlp + norms
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), attention included."""
        d, hd = self.hidden_size, self.head_dim
        matmul_params = self.num_params - self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        matmul_params += self.vocab_size * d  # the output projection is a matmul, the lookup is not
        # QK^T and AV cost 4*T*H*hd per token and layer forward; causal masking halves it (a
        # sliding-window layer reads at most its window).
        keys_read = sum(
            min(seq_len, 2 * self.sliding_window) if local else seq_len for local in self.sliding_layers
        )
        attention_forward = 2 * keys_read * self.num_heads * hd
        return 6.0 * matmul_params + 3.0 * attention_forward


# ---------------------------------------------------------------------------------------------
# Presets (functions so that each call returns a fresh config).


def tiny(**overrides) -> ModelConfig:
    """A 2-layer model with SmolLM2's vocabulary: trains in seconds on a CPU."""
    return ModelConfig(**overrides)


def smollm2_135m(**overrides) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ).replace(**overrides)


def _llama3(*, hidden, intermediate, layers, heads, head_dim, rope_factor, tied, overrides) -> ModelConfig:
    """The Llama-3.1 / 3.2 family: 128k vocabulary, 8 KV heads, llama3 RoPE scaling to 128k."""
    return ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": rope_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=tied,
    ).replace(**overrides)


def llama3_1b(**overrides) -> ModelConfig:
    """The Llama-3.2-1B shape (random weights in benchmarks)."""
    return _llama3(
        hidden=2048,
        intermediate=8192,
        layers=16,
        heads=32,
        head_dim=64,
        rope_factor=32.0,
        tied=True,
        overrides=overrides,
    )


def llama3_8b(**overrides) -> ModelConfig:
    """The Llama-3.1-8B shape."""
    return _llama3(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        head_dim=128,
        rope_factor=8.0,
        tied=False,
        overrides=overrides,
    )


def llama3_70b(**overrides) -> ModelConfig:
    """The Llama-3.1-70B shape."""
    return _llama3(
        hidden=8192,
        intermediate=28672,
        layers=80,
        heads=64,
        head_dim=128,
        rope_factor=8.0,
        tied=False,
        overrides=overrides,
    )


def tiny_qwen3(**overrides) -> ModelConfig:
    """`tiny` as Qwen3: query/key norms, a head_dim (24) that is not hidden / heads."""
    return ModelConfig(architecture="qwen3", qk_norm=True, head_dim=24, rms_norm_eps=1e-6).replace(
        **overrides
    )


def tiny_gemma3(**overrides) -> ModelConfig:
    """`tiny` as Gemma 3: a sliding-window layer (window 48) then a global one, two rotary bases."""
    return ModelConfig(
        architecture="gemma3",
        qk_norm=True,
        query_pre_attn_scalar=24,
        layer_types=(SLIDING, FULL),
        sliding_window=48,
        rope_theta=1_000_000.0,
        local_rope_theta=10_000.0,
        rms_norm_eps=1e-6,
    ).replace(**overrides)


def _qwen3(*, hidden, intermediate, layers, heads, overrides) -> ModelConfig:
    """The Qwen3 dense family: 152k vocabulary, 8 KV heads of 128, untied from 8B up."""
    return ModelConfig(
        architecture="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        qk_norm=True,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ).replace(**overrides)


def qwen3_8b(**overrides) -> ModelConfig:
    """The Qwen3-8B shape."""
    return _qwen3(hidden=4096, intermediate=12288, layers=36, heads=32, overrides=overrides)


def qwen3_32b(**overrides) -> ModelConfig:
    """The Qwen3-32B shape."""
    return _qwen3(hidden=5120, intermediate=25600, layers=64, heads=64, overrides=overrides)


def _gemma3(*, hidden, intermediate, layers, heads, kv_heads, head_dim, scalar, overrides) -> ModelConfig:
    """The Gemma 3 text family: five local layers (window 1024, rotary base 10k) to each global one
    (base 1M, linear scaling 8 to 128k), 262k vocabulary, tied embeddings."""
    return ModelConfig(
        architecture="gemma3",
        vocab_size=262208,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        qk_norm=True,
        query_pre_attn_scalar=scalar,
        layer_types=tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)),
        sliding_window=1024,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        local_rope_theta=10_000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ).replace(**overrides)


def gemma3_12b(**overrides) -> ModelConfig:
    """The Gemma-3-12B text model's shape."""
    return _gemma3(
        hidden=3840,
        intermediate=15360,
        layers=48,
        heads=16,
        kv_heads=8,
        head_dim=256,
        scalar=256,
        overrides=overrides,
    )


def gemma3_27b(**overrides) -> ModelConfig:
    """The Gemma-3-27B text model's shape."""
    return _gemma3(
        hidden=5376,
        intermediate=21504,
        layers=62,
        heads=32,
        kv_heads=16,
        head_dim=128,
        scalar=168,
        overrides=overrides,
    )


PRESETS = {
    "tiny": tiny,
    "tiny_qwen3": tiny_qwen3,
    "tiny_gemma3": tiny_gemma3,
    "smollm2_135m": smollm2_135m,
    "llama3_1b": llama3_1b,
    "llama3_8b": llama3_8b,
    "llama3_70b": llama3_70b,
    "qwen3_8b": qwen3_8b,
    "qwen3_32b": qwen3_32b,
    "gemma3_12b": gemma3_12b,
    "gemma3_27b": gemma3_27b,
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)


# ---------------------------------------------------------------------------------------------
# Hugging Face configs.


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
