"""A resilient, cached client for any OpenAI-compatible chat endpoint.

`LLMClient` wraps `openai.AsyncOpenAI` with the SDK's own retries switched off (`max_retries=0`) and adds:

* bounded concurrency (an `asyncio.Semaphore` held only while a request is on the wire, not while backing off);
* retries with exponential backoff and full jitter on HTTP 408/409/429/5xx, timeouts, dropped connections and
  bodies that are not a valid chat completion (non-JSON, truncated JSON, no choices, no content); a
  `Retry-After` header is honoured, capped at `retry_after_cap` seconds;
* after `max_retries` retries (``max_retries + 1`` attempts) or on a non-retryable answer (another 4xx) the call
  ends as a `Completion` whose `error` is an `LLMCallFailed`: the error is returned, never raised, so one bad
  request cannot kill a batch;
* a content-addressed on-disk cache, `<cache_dir>/cache.jsonl`: one JSON line per answer, appended, flushed
  and fsync'ed as soon as the answer arrives. The key is the sha256 of the canonical JSON of the request
  (model, messages, temperature, max_tokens, seed, extra params) and a caller `tag`, so deliberately repeated
  identical prompts stay distinct. On start the file is loaded; a truncated last line (a crash mid-write) is
  dropped and the file is cut back to its last whole line. A re-run sends no request for a cached key, and a run
  killed at any moment resumes losing no saved answer and writing none twice. Failures are not cached.
  Concurrent calls for one key share a single request. One process (one client) should write a cache dir
  at a time, and a client belongs to the event loop it is first used in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import openai

log = logging.getLogger(__name__)

CACHE_FILE = "cache.jsonl"
RETRYABLE_STATUS = frozenset({408, 409, 429})

# retry / failure reasons
RATE_LIMITED = "rate_limited"  # HTTP 429
SERVER_ERROR = "server_error"  # HTTP 5xx
TIMEOUT = "timeout"
CONNECTION = "connection"  # refused, reset, closed without a response
BAD_RESPONSE = "bad_response"  # 200 with a body that is not a usable chat completion
HTTP_ERROR = "http_error"  # 408/409 (retried) or any other 4xx (not retried)
UNEXPECTED = "unexpected"  # an exception of no known kind: not retried


class LLMCallFailed(Exception):
    """Why a call produced no answer. Returned in `Completion.error`, not raised (raise it if you like)."""

    def __init__(self, reason: str, message: str, *, attempts: int, status: int | None = None, key: str = ""):
        super().__init__(f"{reason} after {attempts} attempt(s): {message}")
        self.reason = reason
        self.message = message
        self.attempts = attempts
        self.status = status
        self.key = key


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str | None
    finish_reason: str | None
    usage: dict | None
    cached: bool
    error: LLMCallFailed | None = None
    key: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class _Retryable(Exception):
    def __init__(
        self, reason: str, message: str, *, status: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, reason: str, message: str, *, status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def cache_key(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


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


def _parse_completion(body: bytes) -> tuple[str, str | None, dict | None]:
    """(text, finish_reason, usage) of a chat completion body, or `_Retryable(BAD_RESPONSE)`."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        snippet = body[:80].decode("utf-8", "replace")
        why = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise _Retryable(BAD_RESPONSE, f"body is not JSON ({why}): {snippet!r}") from err
    if not isinstance(data, dict):
        raise _Retryable(BAD_RESPONSE, f"body is JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        detail = data.get("error") or "no choices"
        raise _Retryable(BAD_RESPONSE, f"not a chat completion: {str(detail)[:200]}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise _Retryable(BAD_RESPONSE, "the first choice has no message content")
    finish_reason = choices[0].get("finish_reason")
    usage = data.get("usage")
    if isinstance(usage, dict):
        usage = {k: v for k, v in usage.items() if isinstance(v, int | float)}
    else:
        usage = None
    return content, finish_reason if isinstance(finish_reason, str) else None, usage


def _transport_errors() -> tuple[type[BaseException], ...]:
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


class _Cache:
    """Append-only JSONL answers keyed by request hash."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CACHE_FILE
        self.entries: dict[str, dict] = {}
        self.repaired_bytes = 0  # bytes of a torn last line cut off at load
        self.skipped_lines = 0  # whole lines that were not valid records (or repeated keys)
        self._fd: int | None = None
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(data):
            newline = data.find(b"\n", pos)
            if newline < 0:  # torn last line: a crash during the write
                tail = data[pos:]
                record = self._record(tail)
                if record is not None and record["key"] not in self.entries:
                    # whole record, only its newline was lost: keep it, restore the newline below
                    self.entries[record["key"]] = record
                    good_end = len(data)
                break
            line = data[pos:newline]
            record = self._record(line)
            if record is None:
                if line.strip():
                    self.skipped_lines += 1
                    log.warning("%s: skipping a damaged line at byte %d", self.path, pos)
            elif record["key"] in self.entries:
                self.skipped_lines += 1
            else:
                self.entries[record["key"]] = record
            pos = newline + 1
            good_end = pos
        if good_end < len(data):
            self.repaired_bytes = len(data) - good_end
            log.warning("%s: cutting a torn last line of %d bytes", self.path, self.repaired_bytes)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        elif data and not data.endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _record(line: bytes) -> dict | None:
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str) or "text" not in record:
            return None
        return record

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def append(self, record: dict) -> None:
        line = (canonical_json(record) + "\n").encode("utf-8")
        if self._fd is None:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:  # make the new directory entry durable too
                dir_fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        view = memoryview(line)
        while view:  # one write() for a line in practice; loop in case of a short write
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.entries[record["key"]] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LLMClient:
    """Concurrent, retrying, disk-cached chat completions against an OpenAI-compatible server.

    Use as ``async with LLMClient(...) as client:`` (or call `aclose()`). `complete` never raises for
    a failed call: the `Completion` carries an `LLMCallFailed` in `error` instead.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        cache_dir: str | os.PathLike,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120.0,
        temperature: float = 0.7,
        max_tokens: int = 512,
        seed: int | None = 0,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        retry_after_cap: float = 120.0,
        rng: random.Random | None = None,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self._rng = rng or random.Random()
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self._cache = _Cache(Path(cache_dir))
        self._semaphore: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._transport_errors = _transport_errors()
        self._counters: Counter[str] = Counter()
        self._retries: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()

    @classmethod
    def from_config(cls, llm, cache_dir: str | os.PathLike, **overrides) -> LLMClient:
        """From a `data_builder.config.LLMSection` (or anything with the same attributes)."""
        kwargs = dict(
            base_url=llm.base_url,
            model=llm.model,
            api_key=getattr(llm, "api_key", None) or None,
            concurrency=getattr(llm, "concurrency", 8),
            max_retries=getattr(llm, "max_retries", 6),
            timeout=getattr(llm, "timeout_s", 120.0),
            temperature=getattr(llm, "temperature", 0.7),
            max_tokens=getattr(llm, "max_tokens", 512),
            seed=getattr(llm, "seed", 0),
        )
        kwargs.update(overrides)
        return cls(cache_dir=cache_dir, **kwargs)

    # ----- public API -----

    @property
    def cache_path(self) -> Path:
        return self._cache.path

    def request_for(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tag: str = "",
        temperature: float | None = None,
        max_tokens: int | None = None,
        **params,
    ) -> dict:
        """The cache-key request of a call: what `complete` would hash."""
        seed = params.pop("seed", self.seed)
        return {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "temperature": self.temperature if temperature is None else temperature,
            "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
            "seed": seed,
            "params": params,
            "tag": tag,
        }

    def key_for(self, messages: Sequence[Mapping[str, Any]], **kwargs) -> str:
        return cache_key(self.request_for(messages, **kwargs))

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tag: str = "",
        temperature: float | None = None,
        max_tokens: int | None = None,
        **params,
    ) -> Completion:
        """One chat completion: from the cache if this exact request (and tag) was answered before.

        Extra keyword `params` go into the request body (and the cache key); `seed` overrides the client's.
        """
        request = self.request_for(
            messages, tag=tag, temperature=temperature, max_tokens=max_tokens, **params
        )
        key = cache_key(request)
        record = self._cache.get(key)
        if record is not None:
            self._counters["cache_hits"] += 1
            return self._from_record(record)
        pending = self._inflight.get(key)
        if pending is not None:  # the same request is on its way: share its answer, write it once
            self._counters["deduplicated"] += 1
            result: Completion = await asyncio.shield(pending)
            return dataclasses.replace(result, cached=result.ok)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._fetch(key, request)
            future.set_result(result)
            return result
        except BaseException:  # cancelled (or a disk error): waiters are cancelled too
            future.cancel()
            raise
        finally:
            self._inflight.pop(key, None)

    async def complete_many(
        self,
        requests: Iterable[Mapping[str, Any]],
        progress_desc: str = "llm",
        *,
        progress: bool = True,
    ) -> list[Completion]:
        """Run many `complete` calls concurrently; results in the order of `requests`.

        Each request is a mapping with `messages` and optionally `tag`, `temperature`, `max_tokens` and
        extra params. A tqdm bar shows the rate and ETA, with tokens, cache hits and failures as postfix.
        """
        from tqdm.auto import tqdm

        requests = [dict(r) for r in requests]
        results: list[Completion | None] = [None] * len(requests)

        async def run(index: int, req: dict) -> tuple[int, Completion]:
            messages = req.pop("messages")
            return index, await self.complete(messages, **req)

        tasks = [asyncio.ensure_future(run(i, r)) for i, r in enumerate(requests)]
        bar = tqdm(total=len(tasks), desc=progress_desc, unit="req", disable=not progress, dynamic_ncols=True)
        try:
            for next_done in asyncio.as_completed(tasks):
                index, result = await next_done
                results[index] = result
                bar.update(1)
                c = self._counters
                bar.set_postfix(
                    tok=f"{c['prompt_tokens']}+{c['completion_tokens']}",
                    hits=c["cache_hits"],
                    fail=sum(self._failures.values()),
                    refresh=False,
                )
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
        return results  # type: ignore[return-value]

    def stats(self) -> dict:
        c = self._counters
        return {
            "requests_sent": c["requests_sent"],
            "answered": c["answered"],
            "cache_hits": c["cache_hits"],
            "deduplicated": c["deduplicated"],
            "retries": dict(self._retries),
            "retries_total": sum(self._retries.values()),
            "failures": sum(self._failures.values()),
            "failures_by_reason": dict(self._failures),
            "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "backoff_s": round(c["backoff_ms"] / 1000.0, 3),
            "cached_entries": len(self._cache.entries),
            "cache_repaired_bytes": self._cache.repaired_bytes,
            "cache_skipped_lines": self._cache.skipped_lines,
        }

    async def aclose(self) -> None:
        self._cache.close()
        await self._client.close()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # ----- internals -----

    @staticmethod
    def _from_record(record: dict) -> Completion:
        return Completion(
            text=record["text"],
            finish_reason=record.get("finish_reason"),
            usage=record.get("usage"),
            cached=True,
            key=record["key"],
        )

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        """Seconds before retry number `retry` (1-based): Retry-After if given (capped), else full jitter."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        return self._rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (retry - 1)))

    async def _fetch(self, key: str, request: dict) -> Completion:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        body = {k: request[k] for k in ("model", "messages", "temperature", "max_tokens")}
        if request["seed"] is not None:
            body["seed"] = request["seed"]
        extra_body = dict(request["params"]) or None
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._semaphore:
                    self._counters["requests_sent"] += 1
                    text, finish_reason, usage = await self._post(body, extra_body)
            except _Retryable as err:
                if attempt > self.max_retries:
                    return self._failed(key, err.reason, err.message, attempt, err.status)
                self._retries[err.reason] += 1
                delay = self._backoff(attempt, err.retry_after)
                log.info("retry %d for %s in %.2fs: %s %s", attempt, key[:12], delay, err.reason, err.message)
                self._counters["backoff_ms"] += int(delay * 1000)
                await asyncio.sleep(delay)
                continue
            except _Fatal as err:
                return self._failed(key, err.reason, err.message, attempt, err.status)
            record = {
                "key": key,
                "request": request,
                "text": text,
                "finish_reason": finish_reason,
                "usage": usage,
                "time": time.time(),
            }
            self._cache.append(record)
            self._counters["answered"] += 1
            if usage:
                self._counters["prompt_tokens"] += int(usage.get("prompt_tokens", 0) or 0)
                self._counters["completion_tokens"] += int(usage.get("completion_tokens", 0) or 0)
            return Completion(text, finish_reason, usage, cached=False, key=key)

    def _failed(self, key: str, reason: str, message: str, attempts: int, status: int | None) -> Completion:
        self._failures[reason] += 1
        log.warning("request %s failed (%s) after %d attempt(s): %s", key[:12], reason, attempts, message)
        error = LLMCallFailed(reason, message, attempts=attempts, status=status, key=key)
        return Completion(None, None, None, cached=False, error=error, key=key)

    async def _post(self, body: dict, extra_body: dict | None) -> tuple[str, str | None, dict | None]:
        """One HTTP attempt, classified into a result, `_Retryable` or `_Fatal`."""
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**body, extra_body=extra_body)
            content = raw.http_response.content
        except openai.APITimeoutError as err:
            raise _Retryable(TIMEOUT, str(err)) from err
        except openai.APIConnectionError as err:
            cause = err.__cause__
            raise _Retryable(
                CONNECTION, f"{err} ({type(cause).__name__}: {cause})" if cause else str(err)
            ) from err
        except openai.APIStatusError as err:
            status = err.status_code
            message = f"HTTP {status}: {str(err.body if err.body is not None else err)[:300]}"
            if status == 429:
                raise _Retryable(
                    RATE_LIMITED, message, status=status, retry_after=self._retry_after(err)
                ) from err
            if status >= 500:
                raise _Retryable(
                    SERVER_ERROR, message, status=status, retry_after=self._retry_after(err)
                ) from err
            if status in RETRYABLE_STATUS:
                raise _Retryable(
                    HTTP_ERROR, message, status=status, retry_after=self._retry_after(err)
                ) from err
            raise _Fatal(HTTP_ERROR, message, status=status) from err
        except self._transport_errors as err:
            name = type(err).__name__
            reason = TIMEOUT if "timeout" in name.lower() else CONNECTION
            raise _Retryable(reason, f"{name}: {err}") from err
        except openai.APIError as err:  # e.g. a response the SDK could not validate
            raise _Retryable(BAD_RESPONSE, f"{type(err).__name__}: {err}") from err
        except Exception as err:
            raise _Fatal(UNEXPECTED, f"{type(err).__name__}: {err}") from err
        return _parse_completion(content)

    @staticmethod
    def _retry_after(err: openai.APIStatusError) -> float | None:
        try:
            return parse_retry_after(err.response.headers)
        except Exception:  # a missing or odd response has no Retry-After
            return None
