"""persllm-jax: PersLLM (personified language models) in JAX."""

from persllm_jax.generation import generate
from persllm_jax.loading import load_pretrained, save_pretrained
from persllm_jax.model import CausalLM
from persllm_jax.model_config import ModelConfig

__all__ = ["CausalLM", "ModelConfig", "generate", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
