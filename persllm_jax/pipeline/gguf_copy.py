"""The pipeline's HF copy of a GGUF file, made once per run directory.

transformers dequantises a GGUF on every load (about 16 s for SmolLM2-135M on two cores; an HF
directory loads in about 1 s), and the demo starts its annotator in the build-data and eval steps:
the base step, which reads the same file, writes it once as an HF directory that both load.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path


def is_gguf(source: str | Path) -> bool:
    path = Path(source)
    return path.is_file() and path.suffix == ".gguf"


def same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).is_file() and Path(b).is_file() and Path(a).resolve() == Path(b).resolve()


def hf_copy(source: str | Path, root: Path, export: Callable[[Path], None]) -> Path:
    """`root/<name>-<hash>`, made by `export(directory)` (an `export-hf` of the GGUF) unless it
    exists. Named by the file's place, size and time too, so another or a replaced file is
    converted anew; written beside it and renamed, so a killed conversion is redone. The copy has no
    generation config, so that it loads as the GGUF does (the same end-of-turn tokens)."""
    path = Path(source).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    out = root / f"{path.stem}-{key}"
    if not out.is_dir():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        export(partial)
        (partial / "generation_config.json").unlink(missing_ok=True)
        partial.rename(out)
    return out
