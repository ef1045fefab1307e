"""Tokenizing SFT samples and preference pairs with loss masks on the assistant tokens only.

Masks come from the PREFIX-DIFF of chat-template renders, so any template works, with or without
`{% generation %}` tags (HF's `return_assistant_tokens_mask` needs them and silently yields an
all-zero mask on stock templates). For the assistant message at index i:
  start = len(render(messages[:i], add_generation_prompt=True))   # where the assistant writes
  end   = len(render(messages[:i + 1]).rstrip())                  # where its turn closes
and the characters [start, end) are trainable. Trainable-token rule: everything the template emits
for the assistant turn after the generation prompt - the content and the closing template text,
which includes the end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`) - is
trained, so the model learns to stop; the whitespace after the last non-space character of the
turn (the newline after `<|im_end|>` that separates turns) is not, because generation stops at the
end-of-turn token and never produces it. The full conversation is rendered once and tokenized once
(`add_special_tokens=False`: templates write their own bos) with character offsets; token t is
trainable when its span [s, e) is non-empty and lies inside a trainable character span. Both renders
must be prefixes of the full render, or the template rewrites history and a DataError is raised.

Plain strings (the `text` and string prompt/completion formats) are tokenized like TRL does:
prompt with the tokenizer's special tokens, completion without, then eos if missing; `text` trains
every token, a completion trains the completion and eos.

Truncation rule: a sequence longer than `seq_len` keeps its first `seq_len` tokens (the end is
cut). `targets[t]` is token t+1 and `loss_mask[t]` says token t+1 is trainable, so the last kept
position has no target. When no trainable target remains - or there was none to begin with - a
DataError names the sample and the reason. A preference pair is cut as one: when either side is
longer than `seq_len`, both answers keep the same number of tokens, the fewer of the two answers'
lengths and the room left after the longer prompt, so chosen and rejected are always compared
over answers of one length (see `pair_answer_tokens`). `length` keeps each sequence's token
count before cutting, for the truncation counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from persllm_jax.data.chat_templates import template_options
from persllm_jax.data.formats import Messages, PreferenceExample, SFTExample
from persllm_jax.data.readers import DataError

# The stage token starts our system messages; it must be one token, not its spelling.
_LEADING_TOKEN = re.compile(r"^<[^<>\s]+>")


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one sequence and which of them are trained on (assistant / completion tokens)."""

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    id: str = ""


class TrainingArrays(NamedTuple):
    """Model inputs, next-token targets and masks, right-padded to seq_len."""

    input_ids: np.ndarray  # int32 [seq_len]
    targets: np.ndarray  # int32 [seq_len], targets[t] = input_ids[t + 1]
    loss_mask: np.ndarray  # bool [seq_len], target t is trained on
    attention_mask: np.ndarray  # bool [seq_len], False on padding
    length: np.ndarray  # int32 [], the sequence's token count before it was cut to seq_len


@dataclass(frozen=True)
class TokenizedPair:
    """Training arrays of prompt+chosen and prompt+rejected; masks cover the answers only."""

    id: str
    chosen: TrainingArrays
    rejected: TrainingArrays


def tokenize_conversation(
    tokenizer, messages: Messages | list[dict], sample_id: str, train_from: int = 0, **template_kwargs: Any
) -> TokenizedExample:
    """Token ids of the rendered conversation with the assistant turns at index >= train_from trainable."""
    messages = list(messages)
    full = _render(tokenizer, messages, sample_id, **template_kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i < train_from:
            continue
        if i == 0:
            raise DataError(
                f"sample {sample_id}: the conversation starts with an assistant message; it needs a prompt"
            )
        start_text = _render(
            tokenizer, messages[:i], sample_id, add_generation_prompt=True, **template_kwargs
        )
        end_text = _render(tokenizer, messages[: i + 1], sample_id, **template_kwargs)
        if full.startswith(start_text) and full.startswith(end_text):
            spans.append((i, len(start_text), len(end_text.rstrip())))
        else:  # a template that renders a turn one way last and another way in the history
            spans.append(_span_in_history(tokenizer, messages, i, full, sample_id, **template_kwargs))
    if not spans:
        raise DataError(
            f"sample {sample_id}: no assistant message to train on (roles: {[m.get('role') for m in messages]})"
        )
    ids, offsets = _encode_with_offsets(tokenizer, full, sample_id)
    mask = np.zeros(len(ids), dtype=bool)
    for i, start, end in spans:
        inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
        if not inside.any():
            raise DataError(
                f"sample {sample_id}: assistant message {i} covers no whole token (characters {start}:{end})"
            )
        mask |= inside
    return TokenizedExample(np.asarray(ids, dtype=np.int32), mask, sample_id)


def _span_in_history(tokenizer, messages: list[dict], i: int, full: str, sample_id: str, **template_kwargs):
    """(i, start, end) of assistant message i in `full` for templates whose render of a turn depends
    on what follows it (Qwen3 writes an empty think block before the last reply only): the message's
    content where it first appears after the render of the turns before it, and the end-of-turn
    token right after it. The template text between the turn's header and its content (such as that
    think block) is not trained, as it is not where the prefix diff works."""
    before = _render(tokenizer, messages[:i], sample_id, **template_kwargs)
    content = messages[i].get("content")
    start = full.find(content, len(before)) if full.startswith(before) and isinstance(content, str) else -1
    if not content or start < 0:
        raise DataError(
            f"sample {sample_id}: the chat template rewrites earlier turns (its render of messages[:{i}] is not "
            f"a prefix of the whole conversation's) and assistant message {i}'s content is not found verbatim "
            "after it, so its tokens cannot be located"
        )
    end = start + len(content)
    closing = [t for t in tokenizer.all_special_tokens if full.startswith(t, end)]
    return i, start, end + max(map(len, closing), default=0)


def tokenize_text(tokenizer, text: str, sample_id: str) -> TokenizedExample:
    """Plain text for language modeling: the tokenizer's special tokens, eos appended, all tokens trainable."""
    ids = _with_eos(tokenizer, tokenizer(text, add_special_tokens=True)["input_ids"])
    return TokenizedExample(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool), sample_id)


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, sample_id: str) -> TokenizedExample:
    """String prompt + completion, tokenized apart so no token straddles them; completion and eos trainable."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = _with_eos(tokenizer, tokenizer(completion, add_special_tokens=False)["input_ids"])
    ids = np.asarray(list(prompt_ids) + list(completion_ids), dtype=np.int32)
    mask = np.arange(len(ids)) >= len(prompt_ids)
    return TokenizedExample(ids, mask, sample_id)


def tokenize_sft(tokenizer, example: SFTExample, **template_kwargs: Any) -> TokenizedExample:
    """Tokenize any SFT example by its format."""
    if example.messages is not None:
        _check_stage_token(tokenizer, example)
        return tokenize_conversation(
            tokenizer, example.messages, example.id, example.train_from, **template_kwargs
        )
    if example.prompt_text is not None:
        return tokenize_prompt_completion(tokenizer, example.prompt_text, example.text, example.id)
    return tokenize_text(tokenizer, example.text, example.id)


def tokenize_preference(
    tokenizer, example: PreferenceExample, seq_len: int, pad_id: int | None = None, **template_kwargs: Any
) -> TokenizedPair:
    """Training arrays of prompt+chosen and prompt+rejected, trained on the answer tokens only."""
    pad_id = _pad_id(tokenizer) if pad_id is None else pad_id
    chosen, rejected = tokenize_pair_sides(tokenizer, example, **template_kwargs)
    return pair_training_arrays(example.id, chosen, rejected, seq_len, pad_id)


def tokenize_pair_sides(
    tokenizer, example: PreferenceExample, **template_kwargs: Any
) -> tuple[TokenizedExample, TokenizedExample]:
    """prompt+chosen and prompt+rejected as tokens, uncut and unpadded."""
    sides = {}
    for side, answer in (("chosen", example.chosen_messages), ("rejected", example.rejected_messages)):
        sample_id = f"{example.id} ({side})"
        if example.is_conversational:
            prompt = list(example.prompt_messages)
            _check_stage_token(tokenizer, example, prompt)
            tokenized = tokenize_conversation(
                tokenizer, prompt + list(answer), sample_id, train_from=len(prompt), **template_kwargs
            )
        else:
            tokenized = tokenize_prompt_completion(tokenizer, example.prompt_messages, answer, sample_id)
        sides[side] = tokenized
    return sides["chosen"], sides["rejected"]


def pair_training_arrays(
    pair_id: str, chosen: TokenizedExample, rejected: TokenizedExample, seq_len: int, pad_id: int
) -> TokenizedPair:
    """Both sides cut under the pair rule (`pair_answer_tokens`) and right-padded to seq_len."""
    answer = pair_answer_tokens(chosen, rejected, seq_len)
    arrays = {}
    for side, t in (("chosen", chosen), ("rejected", rejected)):
        start, end = _answer_span(t)
        whole = answer is None or (answer >= end - start and len(t.input_ids) <= seq_len)
        arrays[side] = to_training_arrays(t, seq_len, pad_id, keep=None if whole else start + answer)
    return TokenizedPair(pair_id, arrays["chosen"], arrays["rejected"])


def _answer_span(example: TokenizedExample) -> tuple[int, int]:
    """[first, last + 1) of the trained tokens: the answer (before it, the prompt)."""
    trained = np.flatnonzero(example.loss_mask)
    if not len(trained):
        return len(example.input_ids), len(example.input_ids)
    return int(trained[0]), int(trained[-1]) + 1


def pair_answer_tokens(chosen: TokenizedExample, rejected: TokenizedExample, seq_len: int) -> int | None:
    """The answer tokens both sides keep when the pair does not fit `seq_len` (None: it fits).

    Both keep the same number: the shorter answer's length, and no more than the room the
    longer prompt leaves. A side whose prompt leaves no room fails later with the usual error."""
    if max(len(chosen.input_ids), len(rejected.input_ids)) <= seq_len:
        return None
    (start_c, end_c), (start_r, end_r) = _answer_span(chosen), _answer_span(rejected)
    return max(0, min(end_c - start_c, end_r - start_r, seq_len - max(start_c, start_r)))


def to_training_arrays(
    example: TokenizedExample, seq_len: int, pad_id: int, keep: int | None = None
) -> TrainingArrays:
    """Shift to next-token targets, keep the first seq_len tokens (or `keep`, when fewer),
    right-pad; error if nothing is trained."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and its target), got {seq_len}")
    ids, mask = example.input_ids, example.loss_mask
    if not mask[1:].any():
        # Token 0 is never a target, so a mask only on it trains nothing either.
        raise DataError(
            f"sample {example.id}: has no trainable token (no assistant/completion tokens after the first)"
        )
    kept = min(len(ids), seq_len, len(ids) if keep is None else max(keep, 1))
    target_mask = mask[1:kept]
    if not target_mask.any():
        first = int(np.argmax(mask[1:])) + 1
        raise DataError(
            f"sample {example.id}: no trainable token within the first {seq_len} tokens (the sequence has "
            f"{len(ids)} tokens; the first trainable one is at position {first}); raise seq_len or shorten it"
        )
    out = TrainingArrays(
        input_ids=np.full(seq_len, pad_id, dtype=np.int32),
        targets=np.full(seq_len, pad_id, dtype=np.int32),
        loss_mask=np.zeros(seq_len, dtype=bool),
        attention_mask=np.zeros(seq_len, dtype=bool),
        length=np.asarray(len(ids), dtype=np.int32),
    )
    out.input_ids[:kept] = ids[:kept]
    out.targets[: kept - 1] = ids[1:kept]
    out.loss_mask[: kept - 1] = target_mask
    out.attention_mask[:kept] = True
    return out


def _render(tokenizer, messages: list[dict], sample_id: str, **kwargs: Any) -> str:
    """The chat template's text for the messages; a template error names the sample."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"sample {sample_id}: is a conversation, but the tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, **{**template_options(tokenizer), **kwargs}
        )
    except Exception as e:  # jinja raises TemplateError and also plain exceptions from raise_exception()
        raise DataError(
            f"sample {sample_id}: the chat template failed on messages {len(messages)}: {e}"
        ) from e


def _encode_with_offsets(tokenizer, text: str, sample_id: str) -> tuple[list[int], np.ndarray]:
    """Token ids and [T, 2] character offsets of the rendered text, without added special tokens."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError(
            f"sample {sample_id}: assistant masks need a fast tokenizer with offsets ({e})"
        ) from e
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return list(enc["input_ids"]), offsets


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """The ids with eos appended unless they already end with it."""
    eos = tokenizer.eos_token_id
    ids = list(ids)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else eos (padding is masked out, so its value never matters)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def _check_stage_token(tokenizer, example: SFTExample | PreferenceExample, messages=None) -> None:
    """Our samples start the system message with a stage token; it must encode as one token."""
    messages = example.messages if messages is None else messages
    if example.stage is None or not messages or messages[0].get("role") != "system":
        return
    match = _LEADING_TOKEN.match(str(messages[0].get("content", "")))
    if match is None:
        return
    pieces = tokenizer.encode(match.group(0), add_special_tokens=False)
    if len(pieces) != 1:
        raise DataError(
            f"sample {example.id}: stage token {match.group(0)!r} is not a token of this tokenizer (it encodes as "
            f"{len(pieces)} pieces); add it first (persllm import-hf --add-tokens)"
        )
