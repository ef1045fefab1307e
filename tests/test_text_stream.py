"""Streaming detokenization on a real byte-level BPE tokenizer: the streamed pieces add up to the
full decode (multi-byte characters split across tokens included), stop strings cut where they
start, and the work per token does not grow with the reply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers

from persllm_jax.inference.text_stream import TextStream

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
TEXTS = [
    "Elementary, my dear Watson. The game is afoot!",
    "Pemberley — c'est magnifique; naïve café, 東京 and 🐝 bees on the Sussex Downs.",
    "  leading spaces,\nnew lines\n\nand tabs\tinside.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER)


def _stream(tokenizer, ids, stop=()):
    stream, pieces = TextStream(tokenizer, tuple(stop)), []
    for i, token in enumerate(ids):
        stream.add(int(token))
        pieces.append(stream.delta(final=i == len(ids) - 1 or stream.stopped))
        if stream.stopped:
            break
    return stream, pieces


def test_pieces_add_up_to_the_full_decode(tokenizer):
    rng = np.random.default_rng(0)
    cases = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    cases += [rng.integers(0, len(tokenizer), size=40).tolist() for _ in range(20)]  # broken bytes too
    for ids in cases:
        stream, pieces = _stream(tokenizer, ids)
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == stream.text == full, ids


def test_stop_strings_cut_where_they_start(tokenizer):
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    stream, pieces = _stream(tokenizer, ids, stop=("dear Wat",))
    assert stream.stopped and stream.text == "Elementary, my " == "".join(pieces)


def test_work_per_token_is_constant(tokenizer):
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(" ".join([TEXTS[1]] * 30), add_special_tokens=False)
    assert len(ids) > 600
    stream, pieces = _stream(Counting(), ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    # two short windows per token; decoding the whole row each time would be len(ids)^2 / 2
    assert sum(calls) < 16 * len(ids), (sum(calls), len(ids))
