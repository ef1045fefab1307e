"""The DPO reference log-probs on disk: `<run_dir>/reference_logps/<key>.npz`, one array per
data source and side, keyed by the data content, the reference weights and the settings that
change a log-prob, plus `current.json` naming the key a run began with, so that a restart reads
the cache instead of recomputing it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")


def _mix(h):
    """A 32-bit integer hash (murmur3's finalizer), elementwise on uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def tensor_digest(x: jax.Array) -> jax.Array:
    """Two uint32 words that change with any bit of any element and with its position.

    Integer arithmetic only, summed with wrap-around: exact for any size (positions are integers,
    not floats) and independent of how the tensor is sharded, since the sums are reduced where
    the shards are, in any order, with the same result. Nothing is gathered onto one device."""
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32)
    position = jnp.zeros(x.shape, jnp.uint32)
    for axis, size in enumerate(x.shape):  # row-major linear index, wrapping past 2^32
        position = position * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    first = _mix(bits ^ _mix(position + jnp.uint32(0x9E3779B9)))
    second = _mix(first ^ _mix(position ^ jnp.uint32(0x7F4A7C15)))
    return jnp.stack([first.sum(dtype=jnp.uint32), second.sum(dtype=jnp.uint32)])


def weights_fingerprint(params: nnx.State) -> str:
    """A hash of every weight tensor's path, shape, dtype and `tensor_digest`."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(np.asarray(jax.device_get(tensor_digest(leaf)), np.uint32).tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary, the added and special tokens and the chat template: what turns a pair into ids."""
    parts = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.special_tokens_map,
        "template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gather(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ReferenceCache:
    """Reference log-probs `{side: [array per source]}`, keyed by the data content, the reference
    weights and `settings` (everything else that changes a log-prob: tokenizer and chat template,
    seq_len and the truncation rule, compute dtype, attention kernel, logits chunk)."""

    def __init__(self, directory: Path, data_fingerprint: str, num_sources: int, settings: dict):
        self.directory, self.data_fingerprint, self.num_sources = directory, data_fingerprint, num_sources
        self.settings = _digest(settings)
        self.pointer = directory / "current.json"

    def load_or_compute(self, initial_params, compute: Callable[[nnx.State], dict], source: dict) -> dict:
        """The cached log-probs if present, else `compute(params)` saved.

        `initial_params` is the reference weights, or, when a run resumes from a checkpoint, a
        function returning them; `source` says where they come from (model path, preset, seed,
        added tokens). With the weights at hand their fingerprint is part of the key. On a resume
        they are not loaded just to be hashed: the key the run began with is used if data,
        settings and source are all unchanged."""
        source_digest = _digest(source)
        if callable(initial_params) and self.pointer.is_file():
            current = json.loads(self.pointer.read_text())
            path = self.directory / f"{current.get('key')}.npz"
            same = (current.get("data_fingerprint"), current.get("settings"), current.get("source")) == (
                self.data_fingerprint,
                self.settings,
                source_digest,
            )
            if same and path.is_file():
                log.info("reference log-probs loaded from cache %s", path)
                return self._load(path)
        params = initial_params() if callable(initial_params) else initial_params
        key = _digest([self.data_fingerprint, weights_fingerprint(params), self.settings])
        path = self.directory / f"{key}.npz"
        if path.is_file():
            log.info("reference log-probs loaded from cache %s", path)
            reference = self._load(path)
        else:
            reference = compute(params)
            if jax.process_index() == 0:
                self._save(path, reference)
                log.info("reference log-probs computed and cached in %s", path)
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            pointer = {"key": key, "data_fingerprint": self.data_fingerprint, "settings": self.settings}
            self.pointer.write_text(json.dumps({**pointer, "source": source_digest}))
        return reference

    def _save(self, path: Path, reference: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        flat = {
            f"{side}_{s}": np.asarray(v, np.float32) for side in SIDES for s, v in enumerate(reference[side])
        }
        tmp = path.with_suffix(".tmp.npz")  # written whole, then renamed: a crash leaves no half file
        np.savez(tmp, **flat)
        tmp.replace(path)

    def _load(self, path: Path) -> dict:
        with np.load(path) as data:
            return {side: [data[f"{side}_{s}"] for s in range(self.num_sources)] for side in SIDES}
