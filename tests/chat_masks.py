"""Reading a training mask back as text, for the assistant-mask audits of chat templates."""

from __future__ import annotations

import numpy as np


def masked_runs(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The token ids of each maximal run of True in the mask."""
    runs, current = [], []
    for token, on in zip(ids.tolist(), mask.tolist()):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def decode(tokenizer, ids) -> str:
    """The text of `ids` exactly, special tokens and spacing included."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
