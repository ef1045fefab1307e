"""The DPO reference log-probs on disk: `<run_dir>/reference_logps/<key>.npz`, one array per
data source and side, keyed by the data content and the reference weights, plus `current.json`
naming the key a run began with, so that a restart reads the cache instead of recomputing it."""

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


def weights_fingerprint(params: nnx.State) -> str:
    """A hash of the weights from per-tensor sums and position-weighted sums (computed on device)."""

    @jax.jit
    def stats(leaf):
        x = leaf.astype(jnp.float32).reshape(-1)
        weights = jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * 0.618)
        return jnp.stack([x.sum(), (x * weights).sum(), (x * x).sum()])

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(str(leaf.shape).encode())
        digest.update(np.asarray(jax.device_get(stats(leaf)), np.float32).tobytes())
    return digest.hexdigest()[:16]


def gather(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ReferenceCache:
    """Reference log-probs `{side: [array per source]}` for one data fingerprint."""

    def __init__(self, directory: Path, data_fingerprint: str, num_sources: int):
        self.directory, self.data_fingerprint, self.num_sources = directory, data_fingerprint, num_sources
        self.pointer = directory / "current.json"

    def load_or_compute(self, initial_params, compute: Callable[[nnx.State], dict]) -> dict:
        """The cached log-probs if present, else `compute(params)` saved. `initial_params` is the
        reference weights, or a function returning them (called only when they are needed)."""
        if self.pointer.is_file():  # a restart: the key was fixed when the run began
            current = json.loads(self.pointer.read_text())
            path = self.directory / f"{current['key']}.npz"
            if current.get("data_fingerprint") == self.data_fingerprint and path.is_file():
                log.info("reference log-probs loaded from cache %s", path)
                return self._load(path)
        params = initial_params() if callable(initial_params) else initial_params
        key = hashlib.sha256(f"{self.data_fingerprint}:{weights_fingerprint(params)}".encode()).hexdigest()[
            :20
        ]
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
            self.pointer.write_text(json.dumps({"key": key, "data_fingerprint": self.data_fingerprint}))
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
