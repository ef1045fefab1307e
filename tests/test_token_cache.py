"""The training tasks keep each example's tokens between steps, not its padded rows: host memory
grows with the dataset's tokens, whatever train.seq_len is."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import transformers

from persllm_jax.data import sft_example, to_training_arrays, tokenize_sft
from persllm_jax.train.tasks.token_cache import TokenCache

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"


def test_20000_examples_cost_their_tokens_not_seq_len():
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    examples = [
        sft_example({"id": f"t{i}", "text": f"Note {i}: the Analytical Engine weaves algebraic patterns."})
        for i in range(20_000)
    ]
    cache = TokenCache(lambda e: tokenize_sft(tokenizer, e))
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    total_tokens = 0
    for i, example in enumerate(examples):
        total_tokens += len(cache.get(("src", i), example).input_ids)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(cache) == 20_000
    # ids at 4 bytes and the mask at 1 bit per token, plus numpy's per-array overhead (about 0.2 KB
    # for each of the two arrays and the entry); padded rows at seq_len 3000 would be 30 KB each
    bound = 4.125 * total_tokens + 20_000 * 600
    assert cache.nbytes() <= 4.125 * total_tokens + 20_000
    assert grown < bound, (grown, bound)
    assert grown < 20_000 * 3000 * 10 / 20  # under a twentieth of what padded rows would need


def test_a_cached_example_pads_to_the_same_rows_as_a_fresh_one():
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    example = sft_example({"id": "a", "text": "Elementary, my dear Watson; the game is afoot."})
    cache = TokenCache(lambda e: tokenize_sft(tokenizer, e))
    cache.get("a", example)
    again = to_training_arrays(cache.get("a", example), 64, 0)
    fresh = to_training_arrays(tokenize_sft(tokenizer, example), 64, 0)
    for name in again._fields:
        np.testing.assert_array_equal(getattr(again, name), getattr(fresh, name), err_msg=name)
