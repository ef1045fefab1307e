"""Reference models from transformers: tiny random ones and the offline SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persllm_jax.io import offline_models

# Tiny random configs; initializer_range is large so logits reach several units and a wrong
# weight layout cannot hide below the tolerance.
TINY_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    max_position_embeddings=256,
    initializer_range=0.25,
)
TINY_VARIANTS = {
    "llama_tied_gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_untied_mqa": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    ),
    "llama_head_dim_llama3_rope": (
        "llama",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama_attention_bias": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    ),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    # Mistral's sliding window on every layer, shorter than the test rows
    "mistral_sliding": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=20)),
    # Qwen3: query/key norms; head_dim 24 is not hidden / heads (16)
    "qwen3_tied_head_dim": (
        "qwen3",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    ),
    "qwen3_untied_bias": (
        "qwen3",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=False,
            attention_bias=True,
        ),
    ),
    # Gemma 3: a window (24) shorter than the test rows, both layer kinds, two rotary bases, a
    # linear-scaled global rope, query_pre_attn_scalar != head_dim
    "gemma3_sliding": (
        "gemma3_text",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
            tie_word_embeddings=True,
        ),
    ),
}


def hf_config(variant: str, **overrides):
    import transformers

    arch, extra = TINY_VARIANTS[variant]
    return transformers.AutoConfig.for_model(arch, **{**TINY_COMMON, **extra, **overrides})


def tiny_hf_model(variant: str, seed: int = 0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant, **overrides))
    with torch.no_grad():  # biases start at zero and norm weights at one in transformers; make them matter
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.25)
            elif "norm" in name:
                param.normal_(1.0, 0.25)
    return model.eval()


def save_tiny(variant: str, out_dir: Path, seed: int = 0, **overrides):
    model = tiny_hf_model(variant, seed, **overrides)
    model.save_pretrained(out_dir)
    return model


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids), attention_mask=mask).logits.float().numpy()


def smollm2_gguf_path() -> Path:
    return offline_models.smollm2_gguf()


def gguf_to_hf_dir(gguf: Path, out_dir: Path) -> Path:
    """transformers' own GGUF loader and save_pretrained: the independent reference checkpoint."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
    return out_dir
