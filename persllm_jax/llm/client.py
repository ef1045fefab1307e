"""A resilient, cached client for any OpenAI-compatible chat endpoint.

`LLMClient` wraps `openai.AsyncOpenAI` with the SDK's own retries switched off (`max_retries=0`) and adds:

* adaptive concurrency (`persllm_jax.llm.adaptive_limit`): at most `concurrency` requests on the wire, fewer
  while the server shows overload (timeouts, 429, 503), a slot held only while a request is on the wire,
  not while backing off. When adaptive, `timeout` is how long an answer may take before it counts as a
  sign of overload (the limit is cut at once), but the request stays on the wire up to `TIMEOUT_GROWTH`
  times `timeout` before it is given up and sent again: a late answer is most likely still being computed,
  and a second copy would only add to the server's queue;
* retries by the policy of `persllm_jax.llm.retry`: exponential backoff with full jitter on HTTP
  408/409/429/5xx, timeouts, dropped connections and bodies that are not a valid chat completion (non-JSON,
  truncated JSON, no choices, no content); a `Retry-After` header is honoured, capped at `retry_after_cap`
  seconds;
* after `max_retries` retries (``max_retries + 1`` attempts) or on a non-retryable answer (another 4xx) the call
  ends as a `Completion` whose `error` is an `LLMCallFailed`: the error is returned, never raised, so one bad
  request cannot kill a batch;
* the content-addressed on-disk cache of `persllm_jax.llm.cache`, keyed by the request and a caller `tag`, so
  deliberately repeated identical prompts stay distinct. A re-run sends no request for a cached key, and a run
  killed at any moment resumes losing no saved answer and writing none twice. Failures are not cached.
  Concurrent calls for one key share a single request. One process (one client) should write a cache dir
  at a time, and a client belongs to the event loop it is first used in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import openai

from persllm_jax.llm.adaptive_limit import AdaptiveLimit
from persllm_jax.llm.cache import AnswerCache, cache_key
from persllm_jax.llm.endpoint import EndpointConfig, resolve_api_key
from persllm_jax.llm.retry import (
    BAD_RESPONSE,
    RATE_LIMITED,
    TIMEOUT,
    FatalError,
    RetryableError,
    backoff_delay,
    classify,
    transport_errors,
)

log = logging.getLogger(__name__)


# When adaptive, how long a late request stays on the wire, as a multiple of the configured timeout.
TIMEOUT_GROWTH = 8


def _is_overload(err: RetryableError) -> bool:
    """A timeout, 429 or 503: the server has more than it can do; anything else is not a load signal."""
    return err.reason in (TIMEOUT, RATE_LIMITED) or err.status == 503


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


def _parse_completion(body: bytes) -> tuple[str, str | None, dict | None]:
    """(text, finish_reason, usage) of a chat completion body, or `RetryableError(BAD_RESPONSE)`."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        snippet = body[:80].decode("utf-8", "replace")
        why = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        raise RetryableError(BAD_RESPONSE, f"body is not JSON ({why}): {snippet!r}") from err
    if not isinstance(data, dict):
        raise RetryableError(BAD_RESPONSE, f"body is JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        detail = data.get("error") or "no choices"
        raise RetryableError(BAD_RESPONSE, f"not a chat completion: {str(detail)[:200]}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise RetryableError(BAD_RESPONSE, "the first choice has no message content")
    finish_reason = choices[0].get("finish_reason")
    usage = data.get("usage")
    if isinstance(usage, dict):
        usage = {k: v for k, v in usage.items() if isinstance(v, int | float)}
    else:
        usage = None
    return content, finish_reason if isinstance(finish_reason, str) else None, usage


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
        adaptive: bool = True,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if backoff_base < 0 or backoff_cap < 0:
            raise ValueError("backoff_s and backoff_cap_s must be >= 0")
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
        self._cache = AnswerCache(Path(cache_dir))
        self._limit = AdaptiveLimit(concurrency, adaptive=adaptive)
        self._inflight: dict[str, asyncio.Future] = {}
        self._transport_errors = transport_errors()
        self._counters: Counter[str] = Counter()
        self._retries: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()

    @classmethod
    def from_config(cls, endpoint: EndpointConfig, cache_dir: str | os.PathLike, **overrides) -> LLMClient:
        """A client of `endpoint`; `overrides` are further constructor arguments (sampling, backoff)."""
        kwargs = dict(
            base_url=endpoint.base_url,
            model=endpoint.model,
            api_key=resolve_api_key(endpoint.api_key),
            concurrency=endpoint.concurrency,
            adaptive=endpoint.adaptive,
            max_retries=endpoint.max_retries,
            timeout=endpoint.timeout_s,
            backoff_base=endpoint.backoff_s,
            backoff_cap=endpoint.backoff_cap_s,
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
        extra params. The progress (a bar, or plain lines off a terminal) shows the rate and the time
        left, with tokens, cache hits and failures.
        """
        from persllm_jax.progress import Progress

        requests = [dict(r) for r in requests]
        results: list[Completion | None] = [None] * len(requests)

        async def run(index: int, req: dict) -> tuple[int, Completion]:
            messages = req.pop("messages")
            return index, await self.complete(messages, **req)

        tasks = [asyncio.ensure_future(run(i, r)) for i, r in enumerate(requests)]
        bar = Progress(len(tasks), progress_desc, unit="req", disable=not progress)
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
            "late_requests": c["late_requests"],
            **self._limit.stats(),
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

    async def _fetch(self, key: str, request: dict) -> Completion:
        body = {k: request[k] for k in ("model", "messages", "temperature", "max_tokens")}
        if request["seed"] is not None:
            body["seed"] = request["seed"]
        extra_body = dict(request["params"]) or None
        attempt = 0
        while True:
            attempt += 1
            try:
                text, finish_reason, usage = await self._attempt(body, extra_body)
            except RetryableError as err:
                if attempt > self.max_retries:
                    return self._failed(key, err.reason, err.message, attempt, err.status)
                self._retries[err.reason] += 1
                delay = backoff_delay(
                    attempt,
                    err.retry_after,
                    base=self.backoff_base,
                    cap=self.backoff_cap,
                    retry_after_cap=self.retry_after_cap,
                    rng=self._rng,
                )
                log.info("retry %d for %s in %.2fs: %s %s", attempt, key[:12], delay, err.reason, err.message)
                self._counters["backoff_ms"] += int(delay * 1000)
                await asyncio.sleep(delay)
                continue
            except FatalError as err:
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

    async def _attempt(self, body: dict, extra_body: dict | None) -> tuple[str, str | None, dict | None]:
        """One request on the wire, inside the adaptive limit, which learns from how it ended and, when
        adaptive, from its being late."""
        started = await self._limit.acquire()
        overloaded = late = False
        try:
            self._counters["requests_sent"] += 1
            if not self._limit.adaptive:
                return await self._post(body, extra_body, self.timeout)
            post = asyncio.ensure_future(self._post(body, extra_body, TIMEOUT_GROWTH * self.timeout))
            try:
                done, _ = await asyncio.wait({post}, timeout=self.timeout)
            except asyncio.CancelledError:
                post.cancel()
                raise
            if not done:
                late = True
                self._counters["late_requests"] += 1
                await self._limit.overloaded(started)
            return await post
        except RetryableError as err:
            overloaded = _is_overload(err) and not (late and err.reason == TIMEOUT)
            raise
        finally:
            await self._limit.release(started, overloaded, signalled=late)

    def _failed(self, key: str, reason: str, message: str, attempts: int, status: int | None) -> Completion:
        self._failures[reason] += 1
        log.warning("request %s failed (%s) after %d attempt(s): %s", key[:12], reason, attempts, message)
        error = LLMCallFailed(reason, message, attempts=attempts, status=status, key=key)
        return Completion(None, None, None, cached=False, error=error, key=key)

    async def _post(
        self, body: dict, extra_body: dict | None, timeout: float
    ) -> tuple[str, str | None, dict | None]:
        """One HTTP attempt: the parsed answer, else `RetryableError` or `FatalError`."""
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                **body, extra_body=extra_body, timeout=timeout
            )
            content = raw.http_response.content
        except Exception as err:
            raise classify(err, self._transport_errors) from err
        return _parse_completion(content)
