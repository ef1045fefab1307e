"""The client against a saturated server: a real HTTP server on loopback that works through its
requests one at a time and keeps computing those whose client gave up (as a busy `transformers
serve` does). With a fixed concurrency, timed-out requests are sent again while their first
copies still queue: a retry storm. The adaptive limit backs off instead."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from persllm_jax.llm.adaptive_limit import AdaptiveLimit
from persllm_jax.llm.client import LLMClient

SERVICE_S = 0.12  # one request's compute time; the server does one at a time
REQUESTS = 60


class BusyServer:
    def __init__(self):
        self.lock, self.counter_lock = threading.Lock(), threading.Lock()
        self.in_flight, self.received, self.timeline = 0, 0, []  # (wall-clock time, requests on the server)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.counter_lock:
                    server.in_flight += 1
                    server.received += 1
                    server.timeline.append((time.time(), server.in_flight))
                with server.lock:  # one at a time, whether or not the client still waits
                    time.sleep(SERVICE_S)
                with server.counter_lock:
                    server.in_flight -= 1
                body = json.dumps({
                    "id": "c", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()  # fmt: skip
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()


def _run(tmp_path, adaptive: bool) -> tuple[dict, BusyServer, float]:
    server = BusyServer()
    client = LLMClient(
        # four retries already send the fixed client's 60 requests about 280 times; each copy costs
        # the server its time, so more would only lengthen the wait for it
        server.base_url, "m", tmp_path / ("adaptive" if adaptive else "fixed"), concurrency=8, max_retries=4,
        timeout=0.6, backoff_base=0.05, backoff_cap=0.5, adaptive=adaptive,
    )  # fmt: skip

    async def go():
        requests = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(REQUESTS)]
        async with client:
            return await client.complete_many(requests, progress=False)

    started = time.monotonic()
    results = asyncio.run(go())
    # let the server finish what it still has queued before counting
    while server.in_flight:
        time.sleep(0.05)
    server.close()
    stats = client.stats()
    stats["answered_ok"] = sum(r.ok for r in results)
    return stats, server, started


@pytest.mark.slow
def test_the_adaptive_limit_sends_fewer_requests_and_settles(tmp_path):
    fixed, fixed_server, _ = _run(tmp_path, adaptive=False)
    adaptive, server, started = _run(tmp_path, adaptive=True)
    assert adaptive["answered_ok"] == REQUESTS
    assert fixed["retries"].get("timeout", 0) > 0, "the fixed client must meet the overload"
    # 8 on the wire wait up to 8 x 0.12 s > 0.6 s: the fixed client times out and sends again
    assert adaptive["requests_sent"] < fixed["requests_sent"], (adaptive, fixed)
    # what reached the server (a request can time out before the server reads it)
    assert (
        REQUESTS
        <= server.received
        <= adaptive["requests_sent"]
        < fixed_server.received
        <= fixed["requests_sent"]
    )
    settled = adaptive["concurrency_settled"]
    assert adaptive["concurrency_decreases"] >= 1 and settled * SERVICE_S < 0.6 + SERVICE_S
    # from the moment the limit settled, the server never holds more than it
    since = adaptive["concurrency_settled_since"]
    late = [n for t, n in server.timeline if t >= since]
    assert len(late) >= 10 and max(late) <= settled, (late, settled)


def test_the_limit_halves_once_per_window_and_grows_back():
    async def go():
        limit = AdaptiveLimit(8)
        starts = [await limit.acquire() for _ in range(8)]
        for s in starts:  # eight timeouts of requests sent together: one cut, not eight
            await limit.release(s, overloaded=True)
        assert limit.limit == 4 and limit.decreases == 1
        for _ in range(4 + 5):  # answers in a row grow it by one per limit-many answers
            await limit.release(await limit.acquire(), overloaded=False)
        assert limit.limit == 6
        for _ in range(50):  # but never back to 8, which overloaded the server
            await limit.release(await limit.acquire(), overloaded=False)
        assert limit.limit == 7
        return limit.stats()

    stats = asyncio.run(go())
    assert stats["concurrency_lowest"] == 4 and stats["max_in_flight"] == 8


def test_a_late_request_cuts_the_limit_while_it_is_still_on_the_wire():
    async def go():
        limit = AdaptiveLimit(8)
        starts = [await limit.acquire() for _ in range(8)]
        await limit.overloaded(starts[0])  # late, still on the wire
        await limit.overloaded(starts[1])  # sent in the same window: no second cut
        assert limit.limit == 4 and limit.decreases == 1 and limit.settled_since is None
        for s in starts[:3]:
            await limit.release(s, overloaded=False, signalled=True)
        # 5 still on the wire, over the new limit: no new request starts, and it has not settled
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limit.acquire(), 0.05)
        assert limit.settled_since is None
        before = time.time()
        await limit.release(starts[3], overloaded=False, signalled=True)
        assert limit.in_flight == 4 and limit.settled_since >= before
        # late answers do not count as answers in a row: the limit does not grow back on them
        for s in starts[4:]:
            await limit.release(s, overloaded=False, signalled=True)
        assert limit.limit == 4

    asyncio.run(go())


@pytest.mark.parametrize("ceiling", [0, -1])
def test_a_limit_below_one_is_refused(ceiling):
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        AdaptiveLimit(ceiling)
