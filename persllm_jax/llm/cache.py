"""The resumable on-disk answer cache of `persllm_jax.llm.client.LLMClient`, and its keys.

`<cache_dir>/cache.jsonl` holds one JSON line per answer, appended, flushed and fsync'ed as soon as the
answer arrives. A key is the sha256 of the canonical JSON of a request (model, messages, sampling, extra
params and a caller tag). On load a truncated last line (a crash mid-write) is dropped and the file cut back
to its last whole line, so a run killed at any moment resumes losing no saved answer and writing none twice.
One process should write a cache directory at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "cache.jsonl"


def canonical_json(obj: Any) -> str:
    """One spelling per value (sorted keys, no spaces), so equal requests hash alike."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


class AnswerCache:
    """Append-only JSONL answers keyed by request hash."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CACHE_FILE
        self.entries: dict[str, dict] = {}
        self.repaired_bytes = 0  # bytes of a torn last line cut off at load
        self.skipped_lines = 0  # whole lines that were not valid records (or repeated keys)
        self._fd: int | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            if newline < 0:  # torn last line: a crash during the write
                tail = data[pos:]
                record = self._record(tail)
                if record is not None and record["key"] not in self.entries:
                    # whole record, only its newline was lost: keep it, restore the newline below
                    self.entries[record["key"]] = record
                    good_end = len(data)
                break
            line = data[pos:newline]
            record = self._record(line)
            if record is None:
                if line.strip():
                    self.skipped_lines += 1
                    log.warning("%s: skipping a damaged line at byte %d", self.path, pos)
            elif record["key"] in self.entries:
                self.skipped_lines += 1
            else:
                self.entries[record["key"]] = record
            pos = newline + 1
            good_end = pos
        if good_end < len(data):
            self.repaired_bytes = len(data) - good_end
            log.warning("%s: cutting a torn last line of %d bytes", self.path, self.repaired_bytes)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        elif data and not data.endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _record(line: bytes) -> dict | None:
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str) or "text" not in record:
            return None
        return record

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def append(self, record: dict) -> None:
        line = (canonical_json(record) + "\n").encode("utf-8")
        if self._fd is None:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:  # make the new directory entry durable too
                dir_fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        view = memoryview(line)
        while view:  # one write() for a line in practice; loop in case of a short write
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.entries[record["key"]] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
