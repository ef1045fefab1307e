"""Reading records from JSONL, Parquet or a `datasets` directory, each tagged with where it came from.

Every record gets `_source` (the file or directory, with the split for a DatasetDict) and `_index`
(its 0-based position in that source, counted before any split filtering so it never shifts);
JSONL records also get `_line`, the 1-based line number, because that is what an editor shows.
`location(record)` turns these into the text used in error messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_SPLIT = "train"


class DataError(ValueError):
    """Bad input data; the message names the file, line or sample and what was expected."""


def location(record: dict[str, Any]) -> str:
    """Where a record came from, e.g. `data/dialogues.jsonl line 7` or `data/pairs.parquet row 3`."""
    source = record.get("_source", "<memory>")
    if "_line" in record:
        return f"{source} line {record['_line']}"
    if "_index" in record:
        return f"{source} row {record['_index']}"
    return str(source)


Keep = Callable[[int], bool]


def read_records(
    path: str | Path, split: str | None = None, keep: Keep | None = None
) -> list[dict[str, Any]]:
    """All records of a JSONL file, a Parquet file or a `save_to_disk` directory, filtered by `split`.

    With `keep`, only the records whose `_index` it accepts are parsed (a host's shard): the
    others are skipped unread, so a host's reading grows with its shard, not with the file."""
    path = Path(path)
    if path.is_dir():
        records = _read_saved_dataset(path, split, keep)
    elif not path.exists():
        raise DataError(
            f"{path}: no such file or directory (expected JSONL, Parquet or a datasets directory)"
        )
    elif path.suffix == ".parquet":
        records = _read_parquet(path, keep)
    else:
        records = _read_jsonl(path, keep)
    if split is None:
        return records
    # Our own files carry a `split` field; a record without one belongs to every split.
    return [r for r in records if r.get("split") is None or r.get("split") == split]


def count_records(path: str | Path, split: str | None = None) -> int:
    """How many records `read_records` numbers in a source (before split filtering), without
    parsing them: JSONL's non-blank lines, Parquet's row count, a dataset's length."""
    path = Path(path)
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a datasets directory saved with save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            name = split or DEFAULT_SPLIT
            if name not in loaded:
                raise DataError(f"{path}: no split {name!r}; available splits: {', '.join(sorted(loaded))}")
            loaded = loaded[name]
        return len(loaded)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or directory (expected JSONL, Parquet or a datasets directory)"
        )
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _read_jsonl(path: Path, keep: Keep | None = None) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped."""
    records, index = [], -1
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            index += 1
            if keep is not None and not keep(index):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: invalid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
            record.update(_source=str(path), _index=index, _line=line_no)
            records.append(record)
    return records


def _kept(count: int, keep: Keep | None) -> list[int]:
    return [i for i in range(count) if keep is None or keep(i)]


def _read_parquet(path: Path, keep: Keep | None = None) -> list[dict[str, Any]]:
    """Rows of a Parquet file as dicts."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        indices = _kept(table.num_rows, keep)
        rows = table.take(indices).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    return [{**row, "_source": str(path), "_index": i} for i, row in zip(indices, rows)]


def _read_saved_dataset(path: Path, split: str | None, keep: Keep | None = None) -> list[dict[str, Any]]:
    """A Dataset, or one split of a DatasetDict, saved with `save_to_disk`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a datasets directory saved with save_to_disk ({e})") from None
    source = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        name = split or DEFAULT_SPLIT
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r}; available splits: {', '.join(sorted(loaded))}")
        loaded, source = loaded[name], f"{path}[{name}]"
    indices = _kept(len(loaded), keep)
    rows = loaded.select(indices).to_list()
    return [{**row, "_source": source, "_index": i} for i, row in zip(indices, rows)]
