"""Finding a model inside a training run directory (see checkpointing.py for the layout)."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR_MARKER = "persllm_model.json"


def step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finished checkpoint, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(p.name), p) for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found)


def run_model_paths(path: Path) -> tuple[Path, Path, Path] | None:
    """(run directory, params directory, tokenizer directory) for a run directory or one of its
    step directories (`run/checkpoints/<step>`); None when `path` is neither."""
    path = Path(path)
    if path.name.isdigit() and (path / "params").is_dir():
        run_dir = path.parent.parent
        return (
            (run_dir, path / "params", run_dir / "tokenizer")
            if (run_dir / MODEL_DIR_MARKER).is_file()
            else None
        )
    if (path / MODEL_DIR_MARKER).is_file():
        steps = [p for _, p in step_dirs(path / "checkpoints") if (p / "params").is_dir()]
        if steps:
            return path, steps[-1] / "params", path / "tokenizer"
    return None
