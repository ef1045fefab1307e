"""The decoder's own configuration: shape, numerics, layer kinds, LoRA settings, and their checks."""

from __future__ import annotations

import dataclasses
import json
import re

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
