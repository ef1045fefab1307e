"""persllm-jax: PersLLM (personified language models) in JAX."""

from persllm_jax.inference.generation import generate
from persllm_jax.io.pretrained import load_pretrained, save_pretrained
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import CausalLM

__all__ = ["CausalLM", "ModelConfig", "generate", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
