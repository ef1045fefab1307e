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
from persllm_jax.data.chat_templates import template_options
from persllm_jax.data.readers import DataError


@dataclasses.dataclass(frozen=True)
class EncodedReply:
    prompt: tuple[int, ...]  # token ids of the conversation before the reply
    reply: tuple[int, ...]  # the reply's own tokens (no end-of-turn marker)
    shared: int = 0  # the prompt's first tokens that render the system message alone (0: none)


def _render(tokenizer, messages: list[dict], what: str, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, **{**template_options(tokenizer), **kwargs}
        )
    except Exception as err:  # jinja raises TemplateError and plain exceptions from raise_exception()
        raise DataError(f"{what}: the chat template failed: {err}") from err


def _system_chars(tokenizer, messages: list[dict], full: str) -> int:
    """How many leading characters of `full` render the system message alone (0 where the template
    cannot render it alone, or folds it into a later turn)."""
    if not messages or messages[0].get("role") != "system":
        return 0
    try:
        alone = tokenizer.apply_chat_template(messages[:1], tokenize=False, **template_options(tokenizer))
    except Exception:  # templates that require a user turn
        return 0
    return len(alone) if alone and full.startswith(alone) else 0


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
    system_end = _system_chars(tokenizer, messages, full)
    # Tokens wholly inside the system message's render; at least one prompt token stays unshared.
    shared = min(int((offsets[:first, 1] <= system_end).sum()) if system_end else 0, first - 1)
    return EncodedReply(tuple(ids[:first]), tuple(ids[first : last + 1]), max(shared, 0))


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _reply_logps(graphdef, state, batch, *, chunk_size):
    """Summed log-prob [R] of each reply row's tokens given its prompt, and the token count [R].

    The cache of a row holds three parts: its shared prefix (left-padded, slots [0, A)), the rest of
    its prompt (right-padded, [A, A + Q)) and its reply ([A + Q, A + Q + C)). Prefixes run once per
    batch, prompts once per prompt, replies once per row, each on the cache rows of the part before."""
    model = nnx.merge(graphdef, state)
    prefix_GA, prefix_pad_G = batch["prefix"], batch["prefix_pad"]
    suffix_UQ, suffix_len_U, prefix_of_U = batch["suffix"], batch["suffix_len"], batch["prefix_of"]
    reply_RC, reply_len_R, prompt_of_R = batch["reply"], batch["reply_len"], batch["prompt_of"]
    g, a = prefix_GA.shape
    u, q = suffix_UQ.shape
    c = reply_RC.shape[1]
    s = a + q + c
    slots_S = jnp.arange(s, dtype=jnp.int32)
    prefix_len_G = a - prefix_pad_G
    key_valid_GS = (slots_S[None, :] >= prefix_pad_G[:, None]) & (
        (slots_S[None, :] < a) | (slots_S[None, :] >= a + q)
    )
    positions_GA = jnp.maximum(jnp.arange(a, dtype=jnp.int32)[None, :] - prefix_pad_G[:, None], 0)

    def key_positions(prefix_len, prompt_len):  # [N, S]: each part's slots continue the part before
        return jnp.where(
            slots_S < a,
            slots_S - (a - prefix_len)[:, None],
            jnp.where(
                slots_S < a + q, prefix_len[:, None] + slots_S - a, prompt_len[:, None] + slots_S - a - q
            ),
        )

    _, (k, v) = model.cached_hidden_states(
        prefix_GA,
        positions_GA,
        key_valid_GS,
        model.init_cache(g, s),
        0,
        key_positions(prefix_len_G, prefix_len_G),
    )
    # the prompts' own tokens, each on its prefix's cache rows
    key_valid_US = key_valid_GS[prefix_of_U] | (
        (slots_S[None, :] >= a) & (slots_S[None, :] < a + suffix_len_U[:, None])
    )
    positions_UQ = prefix_len_G[prefix_of_U][:, None] + jnp.arange(q, dtype=jnp.int32)[None, :]
    cache = (k[:, prefix_of_U], v[:, prefix_of_U])
    prefix_len_U = prefix_len_G[prefix_of_U]
    key_positions_US = key_positions(prefix_len_U, prefix_len_U + suffix_len_U)
    hidden_UQD, (k, v) = model.cached_hidden_states(
        suffix_UQ, positions_UQ, key_valid_US, cache, a, key_positions_US
    )
    last_UD = jnp.take_along_axis(hidden_UQD, (suffix_len_U - 1)[:, None, None], axis=1)[:, 0]
    # the replies, each on its prompt's cache rows
    cache = (k[:, prompt_of_R], v[:, prompt_of_R])
    prompt_len_R = (prefix_len_G[prefix_of_U] + suffix_len_U)[prompt_of_R]
    positions_RC = prompt_len_R[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    hidden_RCD, _ = model.cached_hidden_states(
        reply_RC, positions_RC, key_valid_US[prompt_of_R], cache, a + q, key_positions_US[prompt_of_R]
    )
    # Reply token j is predicted at the position before it: the prompt's last for j = 0.
    before_RCD = jnp.concatenate([last_UD[prompt_of_R][:, None], hidden_RCD[:, :-1]], axis=1)
    where_RC = jnp.arange(c, dtype=jnp.int32)[None, :] < reply_len_R[:, None]
    logps_RC = losses.token_logps(before_RCD, model.output_kernel(), reply_RC, chunk_size, where_RC)
    return logps_RC.sum(-1), where_RC.sum(-1)


class ReplyScorer:
    """Summed and mean log-probabilities of replies under one model; a prompt is run once for all
    its replies, and a system message once for all the prompts that start with it.

    A batch holds up to `prompts_per_batch` distinct prompts with up to `prefixes_per_batch`
    distinct system messages, and every reply to them; each part's length is rounded up to
    `length_multiple` tokens and the reply rows to 4, so that a few shapes compile (each compiles in
    about a second on a CPU, and padding costs more than that)."""

    def __init__(
        self,
        graphdef,
        tokenizer,
        *,
        prompts_per_batch: int = 16,
        prefixes_per_batch: int = 2,
        chunk_size: int = 256,
        length_multiple: int = 8,
    ):
        self.graphdef, self.tokenizer = graphdef, tokenizer
        self.prompts_per_batch, self.prefixes_per_batch = prompts_per_batch, prefixes_per_batch
        self.chunk_size, self.length_multiple = chunk_size, length_multiple
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)

    @classmethod
    def for_model(cls, model, tokenizer, **kwargs) -> tuple[ReplyScorer, nnx.State]:
        graphdef, state = nnx.split(model)
        return cls(graphdef, tokenizer, **kwargs), state

    def _batches(self, prompts: list[tuple[tuple[int, ...], int]]):
        """Prompts (ids, shared) in prefix order, cut into batches within both limits."""
        batch: list = []
        prefixes: set = set()
        for prompt, shared in sorted(prompts, key=lambda p: (p[0][: p[1]], p[0])):
            prefix = prompt[:shared]
            if batch and (
                len(batch) == self.prompts_per_batch
                or (prefix not in prefixes and len(prefixes) == self.prefixes_per_batch)
            ):
                yield batch
                batch, prefixes = [], set()
            batch.append((prompt, shared))
            prefixes.add(prefix)
        if batch:
            yield batch

    def score(self, state, replies: Sequence[EncodedReply]) -> tuple[np.ndarray, np.ndarray]:
        """(summed log-prob [N], reply token count [N]) of each reply; a reply repeated is scored once."""
        unique = list(dict.fromkeys(replies))
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        shared_of: dict[tuple[int, ...], int] = {}
        for i, item in enumerate(unique):
            by_prompt.setdefault(item.prompt, []).append(i)
            shared_of[item.prompt] = item.shared
        totals = np.zeros(len(unique), np.float64)
        counts = np.zeros(len(unique), np.int64)
        for chunk in self._batches(list(shared_of.items())):
            prefixes = list(dict.fromkeys(p[:shared] for p, shared in chunk))
            g, u = self.prefixes_per_batch, self.prompts_per_batch
            rows = [i for prompt, _ in chunk for i in by_prompt[prompt]]
            m = self.length_multiple
            a = _round_up(max(map(len, prefixes)), m)
            q = _round_up(max(len(p) - shared for p, shared in chunk), m)
            c = _round_up(max(len(unique[i].reply) for i in rows), m)
            r = _round_up(len(rows), 4)
            batch = {
                "prefix": np.full((g, a), self.pad_id, np.int32),
                "prefix_pad": np.full((g,), a, np.int32),
                "suffix": np.full((u, q), self.pad_id, np.int32),
                "suffix_len": np.ones((u,), np.int32),
                "prefix_of": np.zeros((u,), np.int32),
                "reply": np.full((r, c), self.pad_id, np.int32),
                "reply_len": np.zeros((r,), np.int32),
                "prompt_of": np.zeros((r,), np.int32),
            }
            for j, prefix in enumerate(prefixes):
                batch["prefix"][j, a - len(prefix) :] = prefix
                batch["prefix_pad"][j] = a - len(prefix)
            k = 0  # the next reply row
            for j, (prompt, shared) in enumerate(chunk):
                batch["suffix"][j, : len(prompt) - shared] = prompt[shared:]
                batch["suffix_len"][j] = len(prompt) - shared
                batch["prefix_of"][j] = prefixes.index(prompt[:shared])
                for i in by_prompt[prompt]:
                    reply = unique[i].reply
                    batch["reply"][k, : len(reply)] = reply
                    batch["reply_len"][k] = len(reply)
                    batch["prompt_of"][k] = j
                    k += 1
            total, count = _reply_logps(self.graphdef, state, batch, chunk_size=self.chunk_size)
            totals[rows] = np.asarray(total, np.float64)[: len(rows)]
            counts[rows] = np.asarray(count)[: len(rows)]
        index = {item: i for i, item in enumerate(unique)}
        at = np.asarray([index[item] for item in replies], np.int64)
        return totals[at], counts[at]
