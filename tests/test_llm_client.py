"""`persllm_jax.llm.client.LLMClient` against the real `transformers serve` (SmolLM2-135M, offline), with a
fault-injecting proxy in between. Generations are greedy and short: the machine may be shared and slow."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persllm_jax.llm.client import LLMCallFailed, LLMClient, _parse_completion
from persllm_jax.llm.endpoint import EndpointConfig
from persllm_jax.llm.retry import (
    BAD_RESPONSE,
    CONNECTION,
    HTTP_ERROR,
    RATE_LIMITED,
    SERVER_ERROR,
    TIMEOUT,
    RetryableError,
    parse_retry_after,
)
from tests.fault_proxy import FAULTS, FaultProxy

REPO = Path(__file__).resolve().parents[1]
FAST_BACKOFF = dict(backoff_base=0.05, backoff_cap=0.5, retry_after_cap=2.0)
REASON_OF_FAULT = {
    "429": RATE_LIMITED,
    "500": SERVER_ERROR,
    "503": SERVER_ERROR,
    "delay": TIMEOUT,
    "truncate": BAD_RESPONSE,
    "nonjson": BAD_RESPONSE,
    "empty": BAD_RESPONSE,
    "drop": CONNECTION,
}


@pytest.fixture(scope="module")
def server(smollm2_transformers_server):
    return smollm2_transformers_server


@pytest.fixture
def proxy(server):
    with FaultProxy(server.base_url, retry_after=1, delay_s=25) as p:
        yield p


def client_for(proxy, server, cache_dir, **kwargs) -> LLMClient:
    options = dict(temperature=0.0, max_tokens=4, concurrency=3, max_retries=6, timeout=60.0, **FAST_BACKOFF)
    options.update(kwargs)
    return LLMClient(proxy.url, server.model, cache_dir, **options)


def question(i: int, marker: str = "") -> list[dict]:
    return [{"role": "user", "content": f"{marker}Name one use of the number {i}."}]


def cache_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----- no server needed -----


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502</html>",
        b'{"id": "x", "choices": [{"message": {"content": "hel',
        b'{"id": "x", "choices": []}',
        b'{"error": {"message": "overloaded"}}',
        b'{"choices": [{"message": {"role": "assistant"}}]}',
        b"[1, 2]",
        b"\xff\xfe",
    ],
)
def test_invalid_bodies_are_retryable(body):
    with pytest.raises(RetryableError) as info:
        _parse_completion(body)
    assert info.value.reason == BAD_RESPONSE


def test_cache_key_covers_request_and_tag(tmp_path):
    client = LLMClient("http://127.0.0.1:9/v1", "m", tmp_path, temperature=0.0, max_tokens=8, seed=1)
    msgs = question(0)
    key = client.key_for(msgs, tag="a")
    assert key == client.key_for(msgs, tag="a", temperature=0.0, max_tokens=8, seed=1)
    assert client.key_for(msgs, tag="a", top_p=0.5, stop=["x"]) == client.key_for(
        msgs, tag="a", stop=["x"], top_p=0.5
    )
    others = [
        client.key_for(msgs, tag="b"),
        client.key_for(question(1), tag="a"),
        client.key_for(msgs, tag="a", temperature=0.5),
        client.key_for(msgs, tag="a", max_tokens=9),
        client.key_for(msgs, tag="a", seed=2),
        client.key_for(msgs, tag="a", top_p=0.5),
    ]
    assert len({key, *others}) == 1 + len(others)
    asyncio.run(client.aclose())


def test_unreachable_server_fails_without_raising(tmp_path):
    async def run():
        async with LLMClient(
            f"http://127.0.0.1:{_closed_port()}/v1", "m", tmp_path, max_retries=2, timeout=5, **FAST_BACKOFF
        ) as client:
            results = await client.complete_many([{"messages": question(i), "tag": str(i)} for i in range(3)])
            return results, client.stats()

    results, stats = asyncio.run(run())
    assert results, "nothing to check"
    assert all(isinstance(r.error, LLMCallFailed) and r.error.reason == CONNECTION for r in results)
    assert all(r.error.attempts == 3 for r in results)
    assert stats["failures"] == 3 and stats["retries"] == {CONNECTION: 6} and stats["requests_sent"] == 9
    assert not (tmp_path / "cache.jsonl").exists() or (tmp_path / "cache.jsonl").read_text() == ""


def test_backoff_keys_of_the_config_set_the_waits(tmp_path):
    """`backoff_s` / `backoff_cap_s` of an endpoint's config bound every wait between attempts: retry
    k waits at most min(cap, backoff_s * 2**(k-1))."""
    endpoint = EndpointConfig(
        base_url=f"http://127.0.0.1:{_closed_port()}/v1", max_retries=3, backoff_s=0.05, backoff_cap_s=0.08
    )

    async def run():
        async with LLMClient.from_config(endpoint, tmp_path) as client:
            await client.complete_many([{"messages": question(0), "tag": "0"}])
            return client.stats()

    stats = asyncio.run(run())
    assert stats["retries"] == {CONNECTION: 3}
    assert 0 <= stats["backoff_s"] <= 0.05 + 0.08 + 0.08 + 0.002  # ms rounding of three waits
    with pytest.raises(ValueError, match="backoff_s and backoff_cap_s must be >= 0"):
        LLMClient.from_config(dataclasses.replace(endpoint, backoff_cap_s=-1), tmp_path)


def _closed_port() -> int:
    from persllm_jax.llm.loopback import free_port

    return free_port()


# ----- the real server -----


def test_server_startup_and_throughput(server):
    tp = server.measure_throughput(n=2, max_tokens=16)
    print(
        f"\ntransformers serve: startup {server.startup_s:.1f}s (warm {server.ready_s:.1f}s); "
        f"{tp['completion_tokens']} tokens in {tp['seconds']:.1f}s = {tp['tokens_per_s']:.1f} tokens/s"
    )
    assert server.startup_s > 0 and tp["completion_tokens"] > 0


def test_completion_then_cache_hit_from_a_second_client(server, proxy, tmp_path):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]

    async def first():
        async with client_for(proxy, server, tmp_path, max_tokens=16) as client:
            result = await client.complete(msgs, tag="item-1")
            return result, client.stats()

    result, stats = asyncio.run(first())
    assert result.ok and not result.cached and result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.usage["prompt_tokens"] > 0 and 0 < result.usage["completion_tokens"] <= 16
    assert stats["requests_sent"] == 1 and stats["cache_hits"] == 0 and stats["retries_total"] == 0
    assert stats["prompt_tokens"] == result.usage["prompt_tokens"]
    assert stats["completion_tokens"] == result.usage["completion_tokens"]
    assert proxy.requests_seen == 1 and proxy.forwarded_for_messages(msgs) == 1
    (line,) = cache_lines(tmp_path / "cache.jsonl")
    assert line["key"] == result.key and line["text"] == result.text
    assert line["request"]["messages"] == msgs and line["request"]["tag"] == "item-1"
    assert {"finish_reason", "usage", "time"} <= set(line)

    async def second():
        async with client_for(proxy, server, tmp_path, max_tokens=16) as client:
            again = await client.complete(msgs, tag="item-1")
            return again, client.stats()

    again, stats = asyncio.run(second())
    assert again.cached and again.text == result.text and again.usage == result.usage
    assert stats["requests_sent"] == 0 and stats["cache_hits"] == 1
    assert proxy.requests_seen == 1  # nothing new reached the proxy


def test_repeated_prompt_with_distinct_tags_and_in_flight_dedup(server, proxy, tmp_path):
    msgs = question(7)

    async def run():
        async with client_for(proxy, server, tmp_path) as client:
            results = await client.complete_many(
                [
                    {"messages": msgs, "tag": "a"},
                    {"messages": msgs, "tag": "b"},
                    {"messages": msgs, "tag": "a"},
                ]
            )
            return results, client.stats()

    results, stats = asyncio.run(run())
    assert results, "nothing to check"
    assert all(r.ok for r in results)
    assert results[0].key == results[2].key != results[1].key
    assert stats["requests_sent"] == 2 and stats["deduplicated"] == 1
    assert proxy.requests_seen == 2
    assert len(cache_lines(tmp_path / "cache.jsonl")) == 2


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=pytest.mark.slow) if f == "delay" else f for f in FAULTS]
)  # "delay" waits out two client timeouts of 15 s
def test_each_fault_type_is_retried_and_the_batch_completes(server, proxy, tmp_path, fault):
    # faults hit the 1st and 3rd request to arrive; "delay" holds them longer than the client timeout
    proxy.set_faults(schedule=[fault, None, fault])
    timeout = 15.0 if fault == "delay" else 60.0
    requests = [{"messages": question(i, f"[{fault}] "), "tag": f"{fault}-{i}"} for i in range(10)]
    # A fixed client gives a late request up at its timeout; the adaptive one keeps waiting (below).
    adaptive = fault != "delay"

    async def run():
        async with client_for(proxy, server, tmp_path, timeout=timeout, adaptive=adaptive) as client:
            t0 = time.monotonic()
            results = await client.complete_many(requests, progress_desc=f"fault {fault}")
            return results, client.stats(), time.monotonic() - t0

    results, stats, seconds = asyncio.run(run())
    print(f"\nfault {fault}: {seconds:.1f}s, stats {stats}")
    assert results, "nothing to check"
    assert all(r.ok and r.text is not None for r in results), [r.error for r in results if not r.ok]
    assert proxy.faults == {fault: 2}
    reason = REASON_OF_FAULT[fault]
    assert stats["retries"].get(reason, 0) >= 2, stats
    assert stats["failures"] == 0 and stats["answered"] == 10
    assert stats["requests_sent"] == proxy.requests_seen >= 12
    if fault == "429":
        assert stats["backoff_s"] >= 2 * 1.0  # Retry-After: 1 was honoured twice
    keys = [line["key"] for line in cache_lines(tmp_path / "cache.jsonl")]
    assert sorted(keys) == sorted(r.key for r in results)


@pytest.mark.slow
def test_an_adaptive_client_waits_for_a_late_answer_and_cuts_its_limit(server, proxy, tmp_path):
    # the 1st and 3rd requests are held 25 s (then dropped), past the 15 s timeout: each is late at
    # 15 s, stays on the wire, and is sent again only when the connection drops
    proxy.set_faults(schedule=["delay", None, "delay"])
    requests = [{"messages": question(i, "[late] "), "tag": f"late-{i}"} for i in range(10)]

    async def run():
        async with client_for(proxy, server, tmp_path, timeout=15.0) as client:
            return await client.complete_many(requests, progress=False), client.stats()

    results, stats = asyncio.run(run())
    assert results and all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert stats["late_requests"] == 2 and stats["concurrency_decreases"] >= 1, stats
    assert stats["retries"] == {"connection": 2} and stats["requests_sent"] == proxy.requests_seen == 12


@pytest.mark.slow
def test_seeded_random_faults_and_a_request_that_always_fails(server, proxy, tmp_path):
    fast_faults = ("429", "500", "503", "truncate", "nonjson", "empty", "drop")
    proxy.set_faults(probabilities={f: 0.05 for f in fast_faults}, seed=3)
    proxy.fail_always("POISON", "500")
    requests = [{"messages": question(i), "tag": f"r{i}"} for i in range(10)]
    requests.insert(4, {"messages": question(99, "POISON "), "tag": "poison"})
    requests.append(
        {"messages": question(5), "tag": "bad-param", "not_a_chat_param": 1}
    )  # the server says 422

    async def run():
        async with client_for(proxy, server, tmp_path, max_retries=8) as client:
            return await client.complete_many(requests, progress_desc="random faults"), client.stats()

    results, stats = asyncio.run(run())
    print(f"\nrandom faults {dict(proxy.faults)}: stats {stats}")
    poison, bad_param = results[4], results[-1]
    others = [r for i, r in enumerate(results) if i not in (4, len(results) - 1)]
    assert others, "nothing to check"
    assert all(r.ok for r in others), [r.error for r in others if not r.ok]
    assert isinstance(poison.error, LLMCallFailed) and poison.text is None
    assert poison.error.reason == SERVER_ERROR and poison.error.attempts == 9 and poison.error.status == 500
    assert isinstance(bad_param.error, LLMCallFailed)
    assert bad_param.error.reason == HTTP_ERROR and bad_param.error.status == 422  # not retried
    bad_param_events = [e for e in proxy.events if "not_a_chat_param" in (e["body"] or {})]
    assert bad_param.error.attempts == len(bad_param_events)  # every attempt went through the proxy
    assert bad_param_events[-1]["fault"] is None and bad_param_events[-1]["status"] == 422
    assert all(e["fault"] is not None for e in bad_param_events[:-1])  # only injected faults were retried
    assert stats["failures"] == 2 and stats["failures_by_reason"] == {SERVER_ERROR: 1, HTTP_ERROR: 1}
    assert stats["retries"][SERVER_ERROR] >= 8
    assert sum(proxy.faults.values()) - 9 > 0  # the random faults struck too
    assert proxy.forwarded_for_messages(question(99, "POISON ")) == 0
    cached = {line["key"] for line in cache_lines(tmp_path / "cache.jsonl")}
    assert cached == {r.key for r in others}  # failures are not cached


@pytest.mark.slow
def test_killed_run_resumes_without_loss_or_duplicates(server, proxy, tmp_path):
    cache_dir = tmp_path / "cache"
    requests = [{"messages": question(i, "[resume] "), "tag": f"k{i}"} for i in range(12)]
    spec = {
        "base_url": proxy.url,
        "model": server.model,
        "cache_dir": str(cache_dir),
        "requests": requests,
        "client": {"temperature": 0.0, "max_tokens": 8, "concurrency": 2, "timeout": 120.0},
    }
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cache_file = cache_dir / "cache.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.llm_servers", "run-batch", str(spec_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if cache_file.exists() and cache_file.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"the batch ended before it was killed:\n{proc.communicate()[1].decode()[-3000:]}"
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    raw = cache_file.read_bytes()
    before = [json.loads(line) for line in raw.split(b"\n") if line.strip() and _is_json(line)]
    assert 4 <= len(before) < len(requests)
    seen_at_kill = proxy.requests_seen

    async def resume():
        async with LLMClient.from_config(
            EndpointConfig(base_url=proxy.url, model=server.model), cache_dir, **spec["client"]
        ) as client:
            return await client.complete_many(requests, progress_desc="resume"), client.stats()

    results, stats = asyncio.run(resume())
    assert results, "nothing to check"
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert stats["cache_hits"] == len(before)
    assert stats["requests_sent"] == len(requests) - len(before)
    assert proxy.requests_seen == seen_at_kill + len(requests) - len(before)
    by_key = {r.key: r for r in results}
    for record in before:  # answered before the kill: served from the cache, never sent again
        assert by_key[record["key"]].cached and by_key[record["key"]].text == record["text"]
        assert proxy.forwarded_for_messages(record["request"]["messages"]) == 1
    assert proxy.max_forwarded() <= 2  # at most the requests in flight at the kill went twice
    lines = cache_lines(cache_file)
    assert len(lines) == len(requests) and len({line["key"] for line in lines}) == len(requests)
    assert {line["key"] for line in lines} == set(by_key)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def test_truncated_last_cache_line_is_repaired(server, proxy, tmp_path):
    requests = [{"messages": question(i, "[repair] "), "tag": f"t{i}"} for i in range(2)]

    async def run(reqs):
        async with client_for(proxy, server, tmp_path) as client:
            return await client.complete_many(reqs, progress=False), client.stats()

    first, _ = asyncio.run(run(requests))
    cache_file = tmp_path / "cache.jsonl"
    good = cache_file.read_bytes()
    torn = json.dumps({"key": "f" * 64, "request": {}, "text": "half a rec"})[:40]
    cache_file.write_bytes(good + torn.encode())  # a crash in the middle of a write

    again, stats = asyncio.run(run(requests))
    assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)
    assert stats["cache_repaired_bytes"] == len(torn) and stats["requests_sent"] == 0
    assert cache_file.read_bytes() == good
    assert proxy.requests_seen == 2

    # a whole record whose newline was lost is kept, and the newline restored
    cache_file.write_bytes(good.rstrip(b"\n"))
    more = requests + [{"messages": question(2, "[repair] "), "tag": "t2"}]
    third, stats = asyncio.run(run(more))
    assert stats["cache_hits"] == 2 and stats["requests_sent"] == 1 and stats["cache_repaired_bytes"] == 0
    lines = cache_lines(cache_file)
    assert len(lines) == 3 and {line["key"] for line in lines} == {r.key for r in third}
