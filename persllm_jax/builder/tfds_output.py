"""The TFDS copy of the built data: `tfds_dir/persllm_dialogues` and `tfds_dir/persllm_pairs`.

Each is a TFDS dataset (version 1.0.0) written by a `tfds.core.GeneratorBasedBuilder` in the
array_record file format, with a `train` and / or `test` split taken from each row's "split"
field (a split without rows is not written, nor a dataset without rows). Nothing here, nor the
reading side, needs TensorFlow:

    import tensorflow_datasets as tfds
    ds = tfds.data_source("persllm_dialogues", data_dir=tfds_dir, split="train")
    ds[0]["messages"]  # {"role": [b"system", b"user", ...], "content": [...]}
    # or: tfds.builder_from_directory(tfds_dir / "persllm_pairs" / "1.0.0").as_data_source()

Features mirror the JSONL rows of dialogues.jsonl and pairs.jsonl: every string field is a `Text`, a message list is a
`Sequence({"role": Text, "content": Text})` (read back column-wise, as bytes), a dialogue's
`analysis` None is stored as "". `read` turns a split back into those rows.

The builder class is not registered: readers go through the files (`dataset_info.json`,
`features.json`), which is also what `tfds.data_source` does for a name it doesn't know.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

DATASET_VERSION = "1.0.0"
SPLITS = ("train", "test")
DIALOGUES = "persllm_dialogues"
PAIRS = "persllm_pairs"

MESSAGE_KEYS = ("role", "content")
DIALOGUE_TEXT = ("id", "persona", "stage", "kind", "analysis", "seed_id", "split")
DIALOGUE_MESSAGES = ("messages",)
PAIR_TEXT = ("id", "persona", "stage", "source", "split")
PAIR_MESSAGES = ("prompt", "chosen", "rejected")

_LAYOUTS = {DIALOGUES: (DIALOGUE_TEXT, DIALOGUE_MESSAGES), PAIRS: (PAIR_TEXT, PAIR_MESSAGES)}
_DESCRIPTIONS = {
    DIALOGUES: "persllm SFT dialogues (persona items and general chats) in messages format.",
    PAIRS: "persllm preference pairs: prompt messages with a chosen and a rejected answer.",
}


def _features(name: str) -> tfds.features.FeaturesDict:
    text_fields, message_fields = _LAYOUTS[name]
    spec = {k: tfds.features.Text() for k in text_fields}
    for k in message_fields:
        spec[k] = tfds.features.Sequence({m: tfds.features.Text() for m in MESSAGE_KEYS})
    return tfds.features.FeaturesDict(spec)


def _example(name: str, row: dict) -> dict:
    text_fields, message_fields = _LAYOUTS[name]
    unknown = set(row) - set(text_fields) - set(message_fields)
    if unknown:
        raise ValueError(f"{name} row {row.get('id')!r}: fields {sorted(unknown)} have no TFDS feature")
    example = {k: "" if row[k] is None and k == "analysis" else row[k] for k in text_fields}
    for k in message_fields:
        messages = []
        for m in row[k]:
            if set(m) != set(MESSAGE_KEYS):
                raise ValueError(
                    f"{name} row {row['id']!r}: {k} message keys {sorted(m)} are not role/content"
                )
            messages.append({"role": m["role"], "content": m["content"]})
        example[k] = messages
    return example


class PersllmBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes one of the two persllm datasets from rows held in memory."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Written by persllm build-data."}
    # The default `code_path` looks for a `checksums.tsv` next to the builder's module and, for
    # a class outside tensorflow_datasets, touches `importlib_resources`, which tfds 4.9.10
    # imports without declaring it (absent here). There is nothing to download: no code path.
    code_path = None

    def __init__(self, *, name: str, rows: list[dict], data_dir: Path):
        self.name = name
        self._rows = rows
        super().__init__(data_dir=str(data_dir), file_format="array_record")

    def _info(self):
        # Not `dataset_info_from_configs`: that reads README/CITATIONS from the code's package.
        # `disable_shuffling` keeps each split in the order of the rows.
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTIONS[self.name],
            features=_features(self.name),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        present = {r["split"] for r in self._rows}
        return {s: self._generate_examples(s) for s in SPLITS if s in present}

    def _generate_examples(self, split: str):
        for i, row in enumerate(r for r in self._rows if r["split"] == split):
            yield i, _example(self.name, row)


def _write_one(tfds_dir: Path, name: str, rows: list[dict]) -> Path | None:
    bad = sorted({str(r.get("split")) for r in rows} - set(SPLITS))
    if bad:
        raise ValueError(f"{name}: rows with split {bad}; expected one of {SPLITS}")
    target = tfds_dir / name
    if target.exists():  # a rebuild replaces the previous dataset
        shutil.rmtree(target)
    if not rows:
        return None
    builder = PersllmBuilder(name=name, rows=rows, data_dir=tfds_dir)
    # TFDS prints "Downloading and preparing dataset ..." for every build, local ones too: what it
    # prints is replaced by one line that says what happened.
    with tempfile.TemporaryDirectory(prefix="tfds-downloads-") as downloads, redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_dir=downloads,
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP),
        )
    log.info("wrote TFDS dataset %s (%d rows) to %s", name, len(rows), builder.data_dir)
    return Path(builder.data_dir)


def write(tfds_dir: Path, dialogues: list[dict], pairs: list[dict]) -> Path:
    """Write `tfds_dir/persllm_dialogues/1.0.0` and `tfds_dir/persllm_pairs/1.0.0` (array_record
    shards, dataset_info.json, features.json); returns `tfds_dir`, the `data_dir` to read with."""
    tfds_dir = Path(tfds_dir)
    tfds_dir.mkdir(parents=True, exist_ok=True)
    _write_one(tfds_dir, DIALOGUES, dialogues)
    _write_one(tfds_dir, PAIRS, pairs)
    return tfds_dir


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_row(name: str, example: dict) -> dict:
    """A record read back by `tfds.data_source` (bytes, column-wise messages) as a JSONL row."""
    text_fields, message_fields = _LAYOUTS[name]
    row = {k: _text(example[k]) for k in text_fields}
    for k in message_fields:
        roles, contents = example[k]["role"], example[k]["content"]
        row[k] = [{"role": _text(r), "content": _text(c)} for r, c in zip(roles, contents, strict=True)]
    if name == DIALOGUES:
        row["analysis"] = row["analysis"] or None
    return row


def read(tfds_dir: Path, name: str, split: str) -> list[dict]:
    """The rows of one split, read back through `tfds.data_source` (no TensorFlow)."""
    source = tfds.data_source(name, data_dir=str(tfds_dir), split=split)
    return [decode_row(name, source[i]) for i in range(len(source))]
