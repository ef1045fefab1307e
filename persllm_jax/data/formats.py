"""The TRL dataset formats, recognised and normalised into SFT examples and preference pairs.

SFT formats (loss on assistant turns / the completion / every token):
- conversational: `messages` (or ShareGPT-style `conversations`), a list of messages;
- prompt_completion: `prompt` + `completion`, both message lists or both strings;
- language_modeling: `text`, a string.
Preference formats:
- preference: `prompt` + `chosen` + `rejected`, all message lists or all strings;
- implicit_preference: `chosen` + `rejected` only, full conversations (or strings) sharing a prefix,
  which is split off as the prompt.
A key whose value is None counts as absent (Parquet and `datasets` fill missing columns with None).
When a record has the keys of several formats, the first match in `FORMATS` order wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persllm_jax.data.readers import DataError, location

Message = dict[str, Any]
Messages = tuple[Message, ...]

# Format name -> the keys that must be present; order decides between overlapping formats.
FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "conversational": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "language_modeling": ("text",),
}
PREFERENCE_FORMATS = ("preference", "implicit_preference")

# ShareGPT speaker names -> chat roles (TRL converts the same way).
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class SFTExample:
    """One SFT sample: a conversation (`messages`), a string completion (`text`) or plain text (`text`).

    `prompt_text` is set only for the string prompt/completion format (loss on `text` only);
    `train_from` is the first message index whose assistant turns are trained (the completion of a
    conversational prompt/completion record; 0 for plain conversations).
    """

    id: str
    messages: Messages | None
    text: str | None
    persona: str | None
    stage: str | None
    prompt_text: str | None = None
    train_from: int = 0
    origin: str = ""  # file and line or row, for messages


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair; message tuples for the conversational format, strings for the standard one."""

    id: str
    prompt_messages: Messages | str
    chosen_messages: Messages | str
    rejected_messages: Messages | str
    persona: str | None
    stage: str | None
    origin: str = ""  # file and line or row, for messages
    pair_source: str | None = None  # how the pair was mined (the record's `source`), for metric slices

    @property
    def is_conversational(self) -> bool:
        """Whether prompt, chosen and rejected are message lists (rendered with the chat template)."""
        return not isinstance(self.prompt_messages, str)


def classify(record: dict[str, Any]) -> str:
    """The name of the first format in `FORMATS` whose keys the record has."""
    present = {k for k, v in record.items() if v is not None and not k.startswith("_")}
    for name, keys in FORMATS.items():
        if all(k in present for k in keys):
            return name
    accepted = "; ".join(f"{name}: {' + '.join(keys)}" for name, keys in FORMATS.items())
    raise DataError(
        f"{_where(record)}: fits no dataset format; it has keys {sorted(present)}, accepted formats are {accepted}"
    )


def normalize(record: dict[str, Any]) -> SFTExample | PreferenceExample:
    """The record as an SFTExample or a PreferenceExample, whichever its format is."""
    if classify(record) in PREFERENCE_FORMATS:
        return preference_example(record)
    return sft_example(record)


def sft_example(record: dict[str, Any]) -> SFTExample:
    """The record as an SFTExample; a preference record is an error."""
    fmt = classify(record)
    common = dict(
        id=_id(record), persona=record.get("persona"), stage=record.get("stage"), origin=location(record)
    )
    if fmt in ("conversational", "sharegpt"):
        key = FORMATS[fmt][0]
        return SFTExample(messages=_messages(record, key), text=None, **common)
    if fmt == "prompt_completion":
        prompt_msgs, completion_msgs = _same_kind(record, ("prompt", "completion"))
        if isinstance(prompt_msgs, str):
            return SFTExample(messages=None, text=completion_msgs, prompt_text=prompt_msgs, **common)
        return SFTExample(
            messages=prompt_msgs + completion_msgs, text=None, train_from=len(prompt_msgs), **common
        )
    if fmt == "language_modeling":
        return SFTExample(messages=None, text=_string(record, "text"), **common)
    raise DataError(f"{_where(record)}: is a {fmt} record, but an SFT format was expected")


def preference_example(record: dict[str, Any]) -> PreferenceExample:
    """The record as a PreferenceExample; an SFT record is an error."""
    fmt = classify(record)
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(
            f"{_where(record)}: is a {fmt} record, but a preference format (prompt/chosen/rejected) was expected"
        )
    if fmt == "preference":
        prompt, chosen, rejected = _same_kind(record, ("prompt", "chosen", "rejected"))
    else:
        prompt, chosen, rejected = _split_implicit_prompt(record, *_same_kind(record, ("chosen", "rejected")))
    return PreferenceExample(
        id=_id(record),
        prompt_messages=prompt,
        chosen_messages=chosen,
        rejected_messages=rejected,
        persona=record.get("persona"),
        stage=record.get("stage"),
        origin=location(record),
        pair_source=record["source"] if isinstance(record.get("source"), str) else None,
    )


def _same_kind(record: dict[str, Any], keys: tuple[str, ...]) -> list[Messages | str]:
    """The values of `keys`, all strings or all message lists (TRL does not mix them)."""
    if all(isinstance(record[k], str) for k in keys):
        return [record[k] for k in keys]
    if any(isinstance(record[k], str) for k in keys):
        kinds = ", ".join(f"{k}: {type(record[k]).__name__}" for k in keys)
        raise DataError(
            f"{_where(record)}: {' / '.join(keys)} must all be strings or all message lists ({kinds})"
        )
    return [_messages(record, k) for k in keys]


def _split_implicit_prompt(
    record: dict[str, Any], chosen: Messages | str, rejected: Messages | str
) -> tuple[Messages | str, Messages | str, Messages | str]:
    """Split the shared prefix of two full conversations (or texts) off as the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        # Cut at the last space of the shared text so both answers start on a word boundary
        # (with their leading space, as word-level tokens carry it).
        cut = chosen.rfind(" ", 0, n) if n < min(len(chosen), len(rejected)) else n
        n = cut if cut > 0 else n
    if n == 0:
        raise DataError(
            f"{_where(record)}: chosen and rejected share no prefix, so there is no prompt to split off"
        )
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{_where(record)}: chosen and rejected are identical up to the end of one of them")
    return chosen[:n], chosen[n:], rejected[n:]


def _messages(record: dict[str, Any], key: str) -> Messages:
    """A message list as a tuple of dicts with `role` and `content`, None-valued keys dropped."""
    value = record[key]
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{_where(record)}: `{key}` must be a non-empty list of messages, got {value!r:.80}")
    return tuple(_message(record, key, i, m) for i, m in enumerate(value))


def _message(record: dict[str, Any], key: str, i: int, message: Any) -> Message:
    """One message, converting ShareGPT's from/value to role/content."""
    if not isinstance(message, dict):
        raise DataError(
            f"{_where(record)}: `{key}[{i}]` must be a dict with role and content, got {message!r:.80}"
        )
    message = {k: v for k, v in message.items() if v is not None}
    if "role" not in message and "from" in message:
        speaker = message.pop("from")
        if speaker not in _SHAREGPT_ROLES:
            raise DataError(
                f"{_where(record)}: `{key}[{i}]` has unknown speaker {speaker!r}; expected one of {sorted(_SHAREGPT_ROLES)}"
            )
        message = {"role": _SHAREGPT_ROLES[speaker], "content": message.pop("value", ""), **message}
    if not isinstance(message.get("role"), str) or ("content" not in message and "tool_calls" not in message):
        raise DataError(
            f"{_where(record)}: `{key}[{i}]` needs a string `role` and a `content`, got keys {sorted(message)}"
        )
    return message


def _string(record: dict[str, Any], key: str) -> str:
    """A string field, or an error naming the record."""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{_where(record)}: `{key}` must be a string, got {type(value).__name__}")
    return value


def _id(record: dict[str, Any]) -> str:
    """The record's own id, or its location when it has none (TRL datasets usually don't)."""
    return str(record["id"]) if record.get("id") is not None else location(record)


def _where(record: dict[str, Any]) -> str:
    """The location plus the sample id, for error messages."""
    where = location(record)
    return f"{where} (sample {record['id']!r})" if record.get("id") is not None else where
