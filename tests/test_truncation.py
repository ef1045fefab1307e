"""Sequences longer than train.seq_len: the cut, its counts, and the DPO rule that chosen and
rejected keep answers of one length. Examples are built here to be too long."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from persllm_jax.data import preference_example, tokenize_preference
from persllm_jax.data.chat_tokenize import tokenize_conversation
from persllm_jax.train.batches import SFTBatch
from persllm_jax.train.tasks.sft import sft_loss

TOKENIZER = Path(__file__).parent / "data" / "tokenizer"
PROMPT = [
    {"role": "system", "content": "You are Sherlock Holmes."},
    {"role": "user", "content": "Where do you live?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER)


def _pair(chosen: str, rejected: str):
    return preference_example(
        {
            "id": "p",
            "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    )


def _whole(tokenizer, answer: str):
    """One side tokenized without any cut: (token count, where the answer starts, its trained
    tokens: the answer and its end-of-turn token, not the template's newline after it)."""
    t = tokenize_conversation(
        tokenizer, PROMPT + [{"role": "assistant", "content": answer}], "p", train_from=2
    )
    trained = np.flatnonzero(t.loss_mask)
    assert trained.size and (np.diff(trained) == 1).all(), "the answer is one run of trained tokens"
    return len(t.input_ids), int(trained[0]), len(trained)


LONG = " ".join(["I have rooms in Baker Street with Dr Watson"] * 8)
SHORT = "Baker Street."


def test_a_pair_that_fits_is_not_cut(tokenizer):
    pair = tokenize_preference(tokenizer, _pair(LONG, SHORT), seq_len=512)
    for side, answer in ((pair.chosen, LONG), (pair.rejected, SHORT)):
        n, _, _ = _whole(tokenizer, answer)
        assert int(side.length) == n == int(side.attention_mask.sum())


def test_one_long_side_cuts_both_answers_to_the_shorter_answer(tokenizer):
    n_long, start_long, _ = _whole(tokenizer, LONG)
    n_short, start_short, answer_short = _whole(tokenizer, SHORT)
    seq_len = n_long - 10  # only the long side overflows
    assert n_short < seq_len
    pair = tokenize_preference(tokenizer, _pair(LONG, SHORT), seq_len)
    assert (int(pair.chosen.length), int(pair.rejected.length)) == (n_long, n_short)
    # the short answer is whole; the long one keeps as many answer tokens
    assert int(pair.rejected.attention_mask.sum()) == n_short
    assert int(pair.chosen.attention_mask.sum()) == start_long + answer_short
    assert int(pair.chosen.loss_mask.sum()) == int(pair.rejected.loss_mask.sum())


def test_two_long_sides_keep_the_room_after_the_longer_prompt(tokenizer):
    other = LONG.replace("Dr Watson", "my Boswell, who writes")
    (n_a, start_a, _), (n_b, start_b, _) = _whole(tokenizer, LONG), _whole(tokenizer, other)
    seq_len = min(n_a, n_b) - 20
    pair = tokenize_preference(tokenizer, _pair(LONG, other), seq_len)
    room = seq_len - max(start_a, start_b)
    assert int(pair.chosen.attention_mask.sum()) == start_a + room
    assert int(pair.rejected.attention_mask.sum()) == start_b + room
    assert int(pair.chosen.loss_mask.sum()) == int(pair.rejected.loss_mask.sum())
    assert (
        int(pair.chosen.attention_mask.sum()) <= seq_len
        and int(pair.rejected.attention_mask.sum()) <= seq_len
    )


def test_the_sft_step_counts_cut_rows():
    t = 8
    length = jnp.asarray([8, 9, 30, 3], jnp.int32)  # rows 1 and 2 were longer than 8 tokens
    ones = jnp.ones((4, t), bool)
    batch = SFTBatch(
        input_ids=jnp.zeros((4, t), jnp.int32), targets=jnp.zeros((4, t), jnp.int32), loss_mask=ones,
        attention_mask=ones, persona_ids=-jnp.ones(4, jnp.int32), stage_ids=-jnp.ones(4, jnp.int32), length=length,
    )  # fmt: skip

    class Uniform:
        """Stand-in model: every hidden state zero, so every log-prob is -log V."""

        def hidden_states(self, ids, mask, positions=None, segment_ids=None):
            return jnp.zeros((*ids.shape, 4))

        def output_kernel(self):
            return jnp.zeros((4, 16))

    _, _, sums = sft_loss(Uniform(), batch, chunk_size=8)
    assert float(sums["truncated"]) == 2.0
