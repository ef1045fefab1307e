"""Finding the newest model inside a training run directory."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR_MARKER = "persllm_model.json"


def step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finished checkpoint, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(p.name), p) for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found)


def latest_model_dir(path: Path) -> Path | None:
    """The newest step directory holding a model, under `path` or `path/checkpoints`."""
    for root in (path / "checkpoints", path):
        candidates = [p for _, p in step_dirs(root) if (p / MODEL_DIR_MARKER).is_file()]
        if candidates:
            return candidates[-1]
    return None
