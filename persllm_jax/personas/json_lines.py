"""The JSON Lines files that sit beside a persona's materials (probes, reference dialogues)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path


def json_lines(path: Path, error: Callable[[str, Path, int], Exception]) -> Iterator[tuple[int, object]]:
    """(line number, decoded value) of each non-blank line; a line that is not JSON raises
    `error(message, path, line)`."""
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as err:
            raise error(f"not valid JSON ({err.msg} at column {err.colno})", path, line) from None
