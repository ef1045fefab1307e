"""The request side of `persllm serve`'s OpenAI protocol: `RequestError` (an HTTP status with an
OpenAI-style error body), `ChatRequest`, and `parse_request` / `parse_messages`, which check a chat
request body as far as can be done without the tokenizer; `ROLES`, the message roles accepted, and
`DEFAULT_MAX_TOKENS`, the completion length of a request that sets none."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from persllm_jax.inference.sampling import GREEDY, OPENAI_TEMPERATURE, OPENAI_TOP_P

DEFAULT_MAX_TOKENS = 512
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request the server answers with an HTTP error and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.retry_after = retry_after  # seconds, sent as the Retry-After header
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(400, f"'{key}' must be a number, got {value!r}", param=key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{key}' must be an integer, got {value!r}", param=key)
    return value


def _content_text(content: Any, index: int) -> str:
    """Message content as text: a string, null, or a list of text parts (what newer clients send)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    400,
                    f"messages[{index}].content: only text parts are supported, got {kind!r}",
                    param="messages",
                )
        return "".join(texts)
    raise RequestError(
        400, f"messages[{index}].content must be a string or a list of text parts", param="messages"
    )


def parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            400, "'messages' must be a non-empty list of {role, content} objects", param="messages"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(
                400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages"
            )
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(
                400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}", param="messages"
            )
        # Chat templates know "system"; "developer" is OpenAI's newer name for the same thing.
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content_text(message.get("content"), i),
            }
        )
    return out


def parse_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat request body. Unknown fields are ignored, as OpenAI clients send many."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    n = _integer(body, "n", 1)
    if n != 1:
        raise RequestError(400, f"only n=1 is supported, got n={n}", param="n")
    max_tokens = _integer(body, "max_completion_tokens", None)
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _integer(body, "max_tokens", None), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(400, f"'{key}' must be at least 1, got {max_tokens}", param=key)
    top_k = _integer(body, "top_k", GREEDY.top_k)  # off
    if top_k == -1:  # vLLM's spelling of "no top-k"
        top_k = 0
    seed = _integer(body, "seed", None)
    if seed is None:
        seed = random.randrange(2**31)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", OPENAI_TEMPERATURE),
        top_p=_number(body, "top_p", OPENAI_TOP_P),
        top_k=top_k,
        repetition_penalty=_number(body, "repetition_penalty", GREEDY.repetition_penalty),  # off
        seed=seed % 2**31,  # any int64 is valid in OpenAI's API; PRNG seeds are 32-bit
        stop=tuple(s for s in stop if s),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )
