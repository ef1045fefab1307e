"""persllm_jax.builder.tfds_output: JSONL rows -> TFDS array_record datasets, read back without TensorFlow."""

import json
import subprocess
import sys

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from persllm_jax.builder import tfds_output  # noqa: E402


def _messages(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


DIALOGUES = [
    {
        "id": "ada/young/0",
        "persona": "ada",
        "stage": "young",
        "kind": "persona",
        "messages": _messages(
            ("system", "Tu es <ada_young>."), ("user", "Qui es-tu ?"), ("assistant", "Ada — ✓")
        ),
        "analysis": "She would answer briefly.\nSecond line.",
        "seed_id": "seed-0",
        "split": "train",
    },
    {
        "id": "general/c1/0",
        "persona": "",
        "stage": "",
        "kind": "general",
        "messages": _messages(("user", "hi"), ("assistant", ""), ("user", "again"), ("assistant", "ok")),
        "analysis": None,
        "seed_id": "",
        "split": "train",
    },
    {
        "id": "ada/old/1",
        "persona": "ada",
        "stage": "old",
        "kind": "refusal",
        "messages": _messages(("system", "s"), ("user", "日本語?"), ("assistant", "no")),
        "analysis": None,
        "seed_id": "seed-1",
        "split": "test",
    },
]

PAIRS = [
    {
        "id": "pair/0",
        "persona": "ada",
        "stage": "young",
        "source": "stage_contrast",
        "prompt": _messages(("system", "Tu es <ada_young>."), ("user", "Qui es-tu ?")),
        "chosen": _messages(("assistant", "Ada.")),
        "rejected": _messages(("assistant", "An AI model.")),
        "split": "train",
    },
    {
        "id": "pair/1",
        "persona": "ada",
        "stage": "old",
        "source": "general",
        "prompt": _messages(("user", "q")),
        "chosen": _messages(("assistant", "a"), ("user", "more"), ("assistant", "b")),
        "rejected": [],
        "split": "train",
    },
]


def _expected(rows, split):
    return [dict(r) for r in rows if r["split"] == split]


# Put first in a subprocess: `import tensorflow` then fails whether or not TensorFlow is installed
# (a finder that refuses it; tensorflow_datasets itself stays importable), and etils' paths are
# told not to look for it, as on a machine without it.
BLOCK_TENSORFLOW = (
    "import os, sys\n"
    "os.environ['EPATH_USE_TF'] = 'false'\n"
    "class _NoTensorFlow:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
    "            raise ModuleNotFoundError('tensorflow is blocked in this test')\n"
    "sys.meta_path.insert(0, _NoTensorFlow())\n"
)


def test_written_and_read_with_tensorflow_blocked(tmp_path):
    """Writing and reading need no TensorFlow: with its import blocked, both still work."""
    code = BLOCK_TENSORFLOW + (
        "import json, sys, tensorflow_datasets as tfds\n"
        "from persllm_jax.builder import tfds_output\n"
        "dialogues, pairs = json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
        "out = tfds_output.write(sys.argv[1], dialogues, pairs)\n"
        "print(len(tfds.data_source('persllm_pairs', data_dir=str(out), split='train')))\n"
    )
    args = [str(tmp_path / "tfds"), json.dumps(DIALOGUES), json.dumps(PAIRS)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "2"
    blocked = subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW + "import tensorflow"], capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "tensorflow is blocked" in blocked.stderr  # the block does block


def test_round_trip_through_data_source(tmp_path):
    out = tfds_output.write(tmp_path / "tfds", DIALOGUES, PAIRS)
    assert out == tmp_path / "tfds"

    # Raw records from tfds.data_source, checked field by field against the rows.
    for name, rows in ((tfds_output.DIALOGUES, DIALOGUES), (tfds_output.PAIRS, PAIRS)):
        text_fields, message_fields = tfds_output._LAYOUTS[name]
        for split in ("train", "test"):
            expected = _expected(rows, split)
            if not expected:
                with pytest.raises(ValueError, match="Unknown split"):
                    tfds.data_source(name, data_dir=str(out), split=split)
                continue
            source = tfds.data_source(name, data_dir=str(out), split=split)
            assert len(source) == len(expected)
            for i, row in enumerate(expected):
                record = source[i]
                assert set(record) == set(row)
                for k in text_fields:
                    want = "" if row[k] is None else row[k]
                    assert record[k] == want.encode("utf-8"), (name, split, i, k)
                for k in message_fields:
                    assert [x.decode() for x in record[k]["role"]] == [m["role"] for m in row[k]]
                    assert [x.decode() for x in record[k]["content"]] == [m["content"] for m in row[k]]

    # read() gives back the JSONL rows exactly (analysis "" -> None).
    for name, rows in ((tfds_output.DIALOGUES, DIALOGUES), (tfds_output.PAIRS, PAIRS)):
        assert tfds_output.read(out, name, "train") == _expected(rows, "train")
    assert tfds_output.read(out, tfds_output.DIALOGUES, "test") == _expected(DIALOGUES, "test")

    # The same through builder_from_directory.
    builder = tfds.builder_from_directory(str(out / tfds_output.DIALOGUES / tfds_output.DATASET_VERSION))
    assert set(builder.info.splits) == {"train", "test"}
    assert builder.info.splits["train"].num_examples == 2
    sources = builder.as_data_source()
    assert [tfds_output.decode_row(tfds_output.DIALOGUES, r) for r in sources["test"]] == _expected(
        DIALOGUES, "test"
    )
    pairs_builder = tfds.builder_from_directory(str(out / tfds_output.PAIRS / tfds_output.DATASET_VERSION))
    assert set(pairs_builder.info.splits) == {"train"}  # no test pairs: no test split

    # On disk: array_record shards, and nothing in another record format.
    for name, splits in ((tfds_output.DIALOGUES, ("train", "test")), (tfds_output.PAIRS, ("train",))):
        version_dir = out / name / tfds_output.DATASET_VERSION
        info = json.loads((version_dir / "dataset_info.json").read_text())
        assert info["fileFormat"] == "array_record"
        for split in splits:
            assert list(version_dir.glob(f"{name}-{split}.array_record-*-of-*"))
        assert not [p for p in version_dir.iterdir() if "tfrecord" in p.name]
    assert not (out / "downloads").exists()


def test_readable_by_a_process_without_our_code(tmp_path):
    """The datasets describe themselves (features.json): a bare process reads them by name."""
    out = tfds_output.write(tmp_path / "tfds", DIALOGUES, PAIRS)
    code = BLOCK_TENSORFLOW + (
        "import sys, tensorflow_datasets as tfds\n"
        "ds = tfds.data_source('persllm_pairs', data_dir=sys.argv[1], split='train')\n"
        "print(len(ds), ds[0]['chosen']['content'][0].decode(), 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "Ada.", "False"]


def test_rewrite_replaces_and_skips_empty(tmp_path):
    out = tmp_path / "tfds"
    tfds_output.write(out, DIALOGUES, PAIRS)
    tfds_output.write(out, DIALOGUES[:1], [])
    assert tfds_output.read(out, tfds_output.DIALOGUES, "train") == DIALOGUES[:1]
    builder = tfds.builder_from_directory(str(out / tfds_output.DIALOGUES / tfds_output.DATASET_VERSION))
    assert set(builder.info.splits) == {"train"}
    assert not list(builder.data_path.glob("*-test.array_record-*"))
    assert not (out / tfds_output.PAIRS).exists()


def test_rejects_unknown_split_and_fields(tmp_path):
    with pytest.raises(ValueError, match="split"):
        tfds_output.write(tmp_path, [dict(DIALOGUES[0], split="validation")], [])
    with pytest.raises(ValueError, match="extra"):
        tfds_output.write(tmp_path, [dict(DIALOGUES[0], extra=1)], [])
