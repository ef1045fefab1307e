"""Stand-ins for the build's embedder and a build of the demo's config without retrieval model,
shared by the builder tests."""

import zlib
from pathlib import Path

import numpy as np

from persllm_jax import configlib
from persllm_jax.builder import build as build_module
from persllm_jax.builder.build import Builder, Item
from persllm_jax.builder.config import BuildConfig
from persllm_jax.builder.references import reference_items
from persllm_jax.personas.materials import load_personas

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "personas"


class FakeEmbedder:
    """Deterministic embeddings for unit tests: a hash of the words, normalized."""

    def encode(self, texts):
        vectors = []
        for text in texts:
            v = np.zeros(64, np.float32)
            for word in text.lower().split():
                v[zlib.crc32(word.encode()) % 64] += 1
            vectors.append(v / max(np.linalg.norm(v), 1e-9))
        return np.stack(vectors)


def example_references(seed=0):
    personas = load_personas(EXAMPLES)
    return personas, reference_items(personas, EXAMPLES, 0.2, seed, Item)


class HashEmbedder:
    """Retrieval is not what the annotation test checks: unit vectors from a hash of the text."""

    def __init__(self, *args):
        pass

    def encode(self, texts):
        vectors = [np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in texts]
        return np.stack([v / np.linalg.norm(v) for v in vectors])


def offline_builder(tmp_path, monkeypatch, *overrides) -> Builder:
    """The demo's build config, two seeds per stage, hashed embeddings (no retrieval model)."""
    monkeypatch.setattr(build_module, "Embedder", HashEmbedder)
    cfg = configlib.load(
        BuildConfig,
        ROOT / "configs" / "data_demo.yaml",
        [f"out_dir={tmp_path}", f"personas_dir={EXAMPLES}", "limits.seeds_per_stage=2", *overrides],
    )
    return Builder(cfg)
