"""Persona materials -> retrieval-augmented annotation -> persona dialogues and preference pairs.

The code lives in `persllm_jax.builder` (with personas in `persllm_jax.personas` and the LLM
client in `persllm_jax.llm`); this package is its short public face, so that a data-building
script needs only `from data_builder import build, BuildConfig`. `python -m data_builder --config
FILE [key=value ...]` is the same command as `persllm build-data`.
"""

from persllm_jax.builder.build import build
from persllm_jax.builder.config import BuildConfig
from persllm_jax.personas.materials import Persona, Stage, load_personas

__all__ = ["BuildConfig", "Persona", "Stage", "build", "load_personas"]
