"""Each training example's tokens, kept between the steps that reuse it: token ids and the
trained-token mask only, unpadded, the mask packed to bits, so host memory grows with the
dataset's tokens (about 4.1 bytes each), not with `train.seq_len`. Rows are padded per batch."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from persllm_jax.data.chat_tokenize import TokenizedExample


def _pack(t: TokenizedExample) -> tuple:
    return np.asarray(t.input_ids, np.int32), np.packbits(np.asarray(t.loss_mask, bool)), t.id


def _unpack(packed: tuple) -> TokenizedExample:
    ids, bits, example_id = packed
    return TokenizedExample(ids, np.unpackbits(bits, count=len(ids)).astype(bool), example_id)


class TokenCache:
    """key -> the example's tokens (one `TokenizedExample`, or a tuple of them for a pair),
    tokenized by `tokenize(example)` the first time a key is asked for."""

    def __init__(self, tokenize: Callable[[Any], TokenizedExample | tuple[TokenizedExample, ...]]):
        self._tokenize = tokenize
        self._entries: dict[Hashable, tuple] = {}

    def get(self, key: Hashable, example):
        entry = self._entries.get(key)
        if entry is None:
            tokens = self._tokenize(example)
            entry = tuple(map(_pack, tokens)) if isinstance(tokens, tuple) else (_pack(tokens),)
            self._entries[key] = entry
        unpacked = tuple(map(_unpack, entry))
        return unpacked if len(unpacked) > 1 else unpacked[0]

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes held by the cached arrays."""
        return sum(ids.nbytes + bits.nbytes for entry in self._entries.values() for ids, bits, _ in entry)
