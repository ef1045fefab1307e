"""Model shapes by name (`preset(name)`; functions, so each call returns a fresh config): tiny test
models of each family and the published shapes of SmolLM2, Llama 3, Qwen3 and Gemma 3."""

from __future__ import annotations

from persllm_jax.model.config import FULL, SLIDING, ModelConfig


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
