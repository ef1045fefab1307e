"""The retry policy of `persllm_jax.llm.client.LLMClient`: why a call failed, which failures are worth
another attempt, how long to wait before it, and how an exception out of the OpenAI SDK (or the HTTP
transport under it) is sorted into one of those reasons.

Retried: HTTP 408/409/429/5xx, timeouts, dropped connections and bodies that are not a usable chat
completion. Not retried: any other 4xx, and exceptions of no known kind. The wait is the server's
`Retry-After` when it sends one (capped), else exponential backoff with full jitter.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

import openai

RETRYABLE_STATUS = frozenset({408, 409, 429})

# retry / failure reasons
RATE_LIMITED = "rate_limited"  # HTTP 429
SERVER_ERROR = "server_error"  # HTTP 5xx
TIMEOUT = "timeout"
CONNECTION = "connection"  # refused, reset, closed without a response
BAD_RESPONSE = "bad_response"  # 200 with a body that is not a usable chat completion
HTTP_ERROR = "http_error"  # 408/409 (retried) or any other 4xx (not retried)
UNEXPECTED = "unexpected"  # an exception of no known kind: not retried


class RetryableError(Exception):
    """One attempt failed in a way another attempt may not; `retry_after` is the server's wish, if any."""

    def __init__(
        self, reason: str, message: str, *, status: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after


class FatalError(Exception):
    """One attempt failed in a way that every further attempt would too."""

    def __init__(self, reason: str, message: str, *, status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None if absent/bad."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000.0
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def backoff_delay(
    retry: int,
    retry_after: float | None,
    *,
    base: float,
    cap: float,
    retry_after_cap: float,
    rng: random.Random,
) -> float:
    """Seconds before retry number `retry` (1-based): Retry-After if given (capped), else full jitter."""
    if retry_after is not None:
        return min(retry_after, retry_after_cap)
    return rng.uniform(0.0, min(cap, base * 2 ** (retry - 1)))


def transport_errors() -> tuple[type[BaseException], ...]:
    """Transport exceptions that can escape the SDK while the body is being read."""
    errors: list[type[BaseException]] = [ConnectionError, asyncio.IncompleteReadError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:  # pragma: no cover - older openai releases use httpx
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import anyio

        errors += [anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def classify(err: Exception, transport: tuple[type[BaseException], ...]) -> RetryableError | FatalError:
    """The failure that `err`, raised by one request, stands for; `transport` is `transport_errors()`.

    The checks go from the most specific kind to the least: the SDK's timeout is also a connection
    error, and every SDK error is an `openai.APIError`.
    """
    if isinstance(err, openai.APITimeoutError):
        return RetryableError(TIMEOUT, str(err))
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__
        return RetryableError(CONNECTION, f"{err} ({type(cause).__name__}: {cause})" if cause else str(err))
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        message = f"HTTP {status}: {str(err.body if err.body is not None else err)[:300]}"
        if status == 429:
            return RetryableError(RATE_LIMITED, message, status=status, retry_after=_retry_after(err))
        if status >= 500:
            return RetryableError(SERVER_ERROR, message, status=status, retry_after=_retry_after(err))
        if status in RETRYABLE_STATUS:
            return RetryableError(HTTP_ERROR, message, status=status, retry_after=_retry_after(err))
        return FatalError(HTTP_ERROR, message, status=status)
    if isinstance(err, transport):
        name = type(err).__name__
        reason = TIMEOUT if "timeout" in name.lower() else CONNECTION
        return RetryableError(reason, f"{name}: {err}")
    if isinstance(err, openai.APIError):  # e.g. a response the SDK could not validate
        return RetryableError(BAD_RESPONSE, f"{type(err).__name__}: {err}")
    return FatalError(UNEXPECTED, f"{type(err).__name__}: {err}")


def _retry_after(err: openai.APIStatusError) -> float | None:
    try:
        return parse_retry_after(err.response.headers)
    except Exception:  # a missing or odd response has no Retry-After
        return None
