"""Scoring a reply to a conversation: the log-probabilities of the reply's own tokens.

A reply is scored as the assistant turn of the conversation: the chat template renders
[system, user, assistant=reply] once, and the reply's tokens are those whose characters lie in the
reply's text. The end-of-turn marker the template writes after it (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`) is not part of the reply: a choice is judged by what it says, not by how likely the
model is to stop after it. Everything before the reply's first token is its prompt.

Choices of one probe share their prompt, so the prompt runs once: a batch of distinct prompts is
run into a KV cache (left-padded, as generation does), each reply row takes its prompt's cache rows
and runs its own tokens on top, and the first reply token is read from the prompt's last position.
One jitted call scores a batch of prompts and all their replies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax import losses
from persllm_jax.data.readers import DataError


@dataclasses.dataclass(frozen=True)
class EncodedReply:
    prompt: tuple[int, ...]  # token ids of the conversation before the reply
    reply: tuple[int, ...]  # the reply's own tokens (no end-of-turn marker)


def _render(tokenizer, messages: list[dict], what: str, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # jinja raises TemplateError and plain exceptions from raise_exception()
        raise DataError(f"{what}: the chat template failed: {err}") from err


def encode_reply(tokenizer, messages: Sequence[dict], reply: str, what: str = "reply") -> EncodedReply:
    """The prompt and reply tokens of `reply` as the assistant's answer to `messages`.

    The conversation is tokenized whole (so the tokens are exactly those of training and chat); the
    reply's tokens are the ones overlapping its characters in the render. `what` names the item in
    errors."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{what}: the tokenizer has no chat template")
    messages = list(messages)
    head = _render(tokenizer, messages, what, add_generation_prompt=True)
    text = reply.strip()
    full = _render(tokenizer, messages + [{"role": "assistant", "content": text}], what)
    start = full.find(text, len(head)) if full.startswith(head) else -1
    if start < 0:
        raise DataError(
            f"{what}: the chat template's render does not hold the reply after the generation prompt, so its "
            "tokens cannot be found"
        )
    end = start + len(text)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    ids = list(enc["input_ids"])
    inside = (offsets[:, 0] < end) & (offsets[:, 1] > start)
    where = np.flatnonzero(inside)
    if not len(where):
        raise DataError(f"{what}: the reply covers no token")
    first, last = int(where[0]), int(where[-1])
    return EncodedReply(tuple(ids[:first]), tuple(ids[first : last + 1]))


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _reply_logps(graphdef, state, prompt_UP, pad_U, row_prompt_R, reply_RC, reply_len_R, *, chunk_size):
    """Summed log-prob [R] of each reply row's tokens given its prompt row, and the token count [R]."""
    model = nnx.merge(graphdef, state)
    u, p = prompt_UP.shape
    r, c = reply_RC.shape
    slots_S = jnp.arange(p + c, dtype=jnp.int32)
    key_valid_US = slots_S[None, :] >= pad_U[:, None]
    positions_UP = jnp.maximum(jnp.arange(p, dtype=jnp.int32)[None, :] - pad_U[:, None], 0)
    hidden_UPD, (k, v) = model.cached_hidden_states(
        prompt_UP, positions_UP, key_valid_US, model.init_cache(u, p + c), 0
    )
    cache = (k[:, row_prompt_R], v[:, row_prompt_R])  # each reply row on its prompt's keys and values
    prompt_len_R = p - pad_U[row_prompt_R]
    positions_RC = prompt_len_R[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    hidden_RCD, _ = model.cached_hidden_states(reply_RC, positions_RC, key_valid_US[row_prompt_R], cache, p)
    # Reply token j is predicted at the position before it: the prompt's last for j = 0.
    before_RCD = jnp.concatenate([hidden_UPD[row_prompt_R, -1:], hidden_RCD[:, :-1]], axis=1)
    where_RC = jnp.arange(c, dtype=jnp.int32)[None, :] < reply_len_R[:, None]
    logps_RC = losses.token_logps(before_RCD, model.output_kernel(), reply_RC, chunk_size, where_RC)
    return logps_RC.sum(-1), where_RC.sum(-1)


class ReplyScorer:
    """Summed and mean log-probabilities of replies under one model, prompts shared between replies.

    `prompts_per_batch` distinct prompts run together, with every reply to them; shapes are rounded
    up (prompt to `length_multiple` tokens, rows to 8) so that few shapes compile."""

    def __init__(
        self,
        graphdef,
        tokenizer,
        *,
        prompts_per_batch: int = 8,
        chunk_size: int = 256,
        length_multiple: int = 32,
    ):
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.prompts_per_batch, self.chunk_size, self.length_multiple = (
            prompts_per_batch,
            chunk_size,
            length_multiple,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def for_model(cls, model, tokenizer, **kwargs) -> tuple[ReplyScorer, nnx.State]:
        graphdef, state = nnx.split(model)
        return cls(graphdef, tokenizer, **kwargs), state

    def score(self, state, replies: Sequence[EncodedReply]) -> tuple[np.ndarray, np.ndarray]:
        """(summed log-prob [N], reply token count [N]) of each reply; a reply repeated is scored once."""
        unique = list(dict.fromkeys(replies))
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(unique):
            by_prompt.setdefault(item.prompt, []).append(i)
        prompts = list(by_prompt)
        totals = np.zeros(len(unique), np.float64)
        counts = np.zeros(len(unique), np.int64)
        longest_prompt = _round_up(max(len(p) for p in prompts), self.length_multiple)
        longest_reply = _round_up(max(len(r.reply) for r in unique), 16)
        for start in range(0, len(prompts), self.prompts_per_batch):
            chunk = prompts[start : start + self.prompts_per_batch]
            rows = [i for prompt in chunk for i in by_prompt[prompt]]
            u = self.prompts_per_batch
            prompt_UP = np.full((u, longest_prompt), self.pad_id, np.int32)
            pad_U = np.full((u,), longest_prompt - len(chunk[0]), np.int32)
            for j, prompt in enumerate(chunk):
                prompt_UP[j, longest_prompt - len(prompt) :] = prompt
                pad_U[j] = longest_prompt - len(prompt)
            prompt_UP[len(chunk) :] = prompt_UP[0]  # unused prompt rows repeat the first
            r = _round_up(len(rows), 8)
            row_prompt_R = np.zeros((r,), np.int32)
            reply_RC = np.full((r, longest_reply), self.pad_id, np.int32)
            reply_len_R = np.zeros((r,), np.int32)
            for k, i in enumerate(rows):
                row_prompt_R[k] = chunk.index(unique[i].prompt)
                reply = unique[i].reply
                reply_RC[k, : len(reply)] = reply
                reply_len_R[k] = len(reply)
            total, count = _reply_logps(
                self.graphdef,
                state,
                prompt_UP,
                pad_U,
                row_prompt_R,
                reply_RC,
                reply_len_R,
                chunk_size=self.chunk_size,
            )
            totals[rows] = np.asarray(total, np.float64)[: len(rows)]
            counts[rows] = np.asarray(count)[: len(rows)]
        index = {item: i for i, item in enumerate(unique)}
        at = np.asarray([index[item] for item in replies], np.int64)
        return totals[at], counts[at]
