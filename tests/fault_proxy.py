"""`FaultProxy`, a fault-injecting reverse proxy for tests of OpenAI-compatible clients.

A stdlib-asyncio HTTP/1.1 reverse proxy on loopback that forwards `/v1/*` to a real server and injects
faults (`FAULTS`) by schedule (arrival order), by seeded probability, or forever for bodies that contain a
marker. It counts every request and, per request-body hash (`body_hash`), how often the request reached
the real server. With `slow_s` it also makes the server slow: forwarded requests are served one at a time,
each after `slow_s` seconds, and are finished even when their client has gone (as a busy server does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

FAULTS = ("429", "500", "503", "delay", "truncate", "nonjson", "empty", "drop")
"""
429       answer 429 with `Retry-After: <retry_after>`; not forwarded
500, 503  answer that status with a JSON error body; not forwarded
delay     hold the connection `delay_s` seconds (longer than the client timeout), then close; not forwarded
truncate  forward, then answer 200 with the first half of the real JSON body (valid HTTP framing)
nonjson   forward, then answer 200 with an HTML page instead of the real body
empty     answer 200 with a JSON chat completion that has no choices; not forwarded
drop      close the connection without any response; not forwarded
"""

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}
_REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
_REASONS.update({502: "Bad Gateway", 503: "Service Unavailable"})


def body_hash(body: bytes | Mapping) -> str:
    """sha256 of a request body: of its canonical JSON when it is JSON, else of the raw bytes."""
    if isinstance(body, Mapping):
        obj = body
    else:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return hashlib.sha256(body).hexdigest()
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _HTTPMessage:
    def __init__(self, start_line: str, headers: list[tuple[str, str]], body: bytes):
        self.start_line = start_line
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


async def _read_message(reader: asyncio.StreamReader, *, is_response: bool = False) -> _HTTPMessage | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial.strip():
            return None  # clean EOF between requests
        raise
    lines = head.decode("latin-1").split("\r\n")
    start_line = lines[0]
    headers = []
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers.append((key.strip(), value.strip()))
    msg = _HTTPMessage(start_line, headers, b"")
    if (msg.header("transfer-encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        msg.body = b"".join(chunks)
    elif msg.header("content-length") is not None:
        msg.body = await reader.readexactly(int(msg.header("content-length")))
    elif is_response:
        msg.body = await reader.read()  # until the server closes
    return msg


def _render_response(status: int, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class FaultProxy:
    """Reverse proxy `http://127.0.0.1:<port>/v1/*` -> `upstream` with injected faults (see `FAULTS`).

    The fault of a request is chosen, in this order, by: the first `fail_always` rule whose marker is in the
    body (every time, forever); the `schedule` entry at the request's arrival index (None = pass); else a
    seeded draw from `probabilities` ({fault: p}). Each request gets a fresh connection (`Connection:
    close`), upstream too. Runs its own event loop in a daemon thread: `with FaultProxy(url) as proxy:`.

    Counters (all thread-safe to read): `requests_seen`, `faults` (Counter by fault), `forwarded` (Counter by
    `body_hash`: times that body reached the real server), `bodies` (hash -> parsed JSON body), `events`
    (one dict per request: index, method, path, fault, hash, body, and the real server's status when
    forwarded). `set_faults`, `fail_always`, `clear_faults` and `reset_counters` may be called while running.
    """

    def __init__(
        self,
        upstream: str,
        *,
        schedule: Sequence[str | None] = (),
        probabilities: Mapping[str, float] | None = None,
        seed: int = 0,
        retry_after: float = 1.0,
        delay_s: float = 5.0,
        slow_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        upstream = upstream.rstrip("/")
        if upstream.endswith("/v1"):
            upstream = upstream[: -len("/v1")]
        hostport = upstream.split("://", 1)[-1]
        self.upstream_host, _, upstream_port = hostport.rpartition(":")
        self.upstream_port = int(upstream_port)
        self.host = host
        self.port = port
        self.retry_after = retry_after
        self.delay_s = delay_s
        self.slow_s = slow_s
        self._serial: asyncio.Lock | None = None  # made on the proxy's own loop
        self._lock = threading.Lock()
        self._rules: list[tuple[Callable[[bytes], bool], str]] = []
        self.set_faults(schedule=schedule, probabilities=probabilities, seed=seed)
        self.reset_counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # ----- configuration -----

    def set_faults(
        self,
        *,
        schedule: Sequence[str | None] = (),
        probabilities: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        """Replace the schedule (indexed from the next request seen) and the probabilities."""
        for fault in [*schedule, *(probabilities or {})]:
            if fault is not None and fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
        if sum((probabilities or {}).values()) > 1.0:
            raise ValueError("fault probabilities add up to more than 1")
        with self._lock:
            self._schedule = list(schedule)
            self._schedule_start = getattr(self, "requests_seen", 0)
            self._probabilities = dict(probabilities or {})
            self._rng = random.Random(seed)

    def fail_always(self, marker: str | bytes | Callable[[bytes], bool], fault: str = "500") -> None:
        """Every request whose raw body contains `marker` (or satisfies it, if callable) gets `fault`."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        if callable(marker):
            match = marker
        else:
            needle = marker.encode() if isinstance(marker, str) else marker
            escaped = json.dumps(marker)[1:-1].encode() if isinstance(marker, str) else needle

            def match(body: bytes) -> bool:
                return needle in body or escaped in body

        with self._lock:
            self._rules.append((match, fault))

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()
        self.set_faults()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests_seen = 0
            self._schedule_start = 0
            self.faults: Counter[str] = Counter()
            self.forwarded: Counter[str] = Counter()
            self.bodies: dict[str, object] = {}
            self.events: list[dict] = []
            self.server_in_flight = 0  # forwarded requests the real server has not answered yet
            self.in_flight_timeline: list[tuple[float, int]] = []  # (wall-clock time, server_in_flight)

    # ----- queries -----

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client: `http://127.0.0.1:<port>/v1`."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def forwarded_total(self) -> int:
        with self._lock:
            return sum(self.forwarded.values())

    def max_forwarded(self) -> int:
        with self._lock:
            return max(self.forwarded.values(), default=0)

    def forwarded_where(self, predicate: Callable[[object], bool]) -> int:
        """How many times requests whose parsed body satisfies `predicate` reached the real server."""
        with self._lock:
            return sum(n for h, n in self.forwarded.items() if predicate(self.bodies.get(h)))

    def forwarded_for_messages(self, messages: Sequence[Mapping]) -> int:
        messages = [dict(m) for m in messages]
        return self.forwarded_where(lambda body: isinstance(body, dict) and body.get("messages") == messages)

    # ----- lifecycle -----

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port, limit=1 << 24)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as err:  # noqa: B036 - reported to the starting thread
                failure.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        thread.join(30)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- the proxy -----

    def _choose(self, raw_body: bytes) -> tuple[int, str | None]:
        with self._lock:
            index = self.requests_seen
            self.requests_seen += 1
            fault = next((f for match, f in self._rules if match(raw_body)), None)
            if fault is None:
                pos = index - self._schedule_start
                if 0 <= pos < len(self._schedule):
                    fault = self._schedule[pos]
                elif self._probabilities:
                    draw = self._rng.random()
                    for name, p in self._probabilities.items():
                        if draw < p:
                            fault = name
                            break
                        draw -= p
            if fault is not None:
                self.faults[fault] += 1
            return index, fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_message(reader)
        if request is None:
            return
        method, target, _ = request.start_line.split(" ", 2)
        if not target.startswith("/v1/"):
            writer.write(_render_response(404, [("Content-Type", "text/plain")], b"not proxied\n"))
            await writer.drain()
            return
        index, fault = self._choose(request.body)
        try:
            parsed = json.loads(request.body) if request.body else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        event = {
            "index": index,
            "method": method,
            "path": target,
            "fault": fault,
            "hash": body_hash(request.body),
            "body": parsed,  # parsed JSON body (None if not JSON); "status" is added once forwarded
        }
        with self._lock:
            self.events.append(event)

        def json_body(obj: dict) -> bytes:
            return json.dumps(obj).encode()

        if fault == "drop":
            writer.transport.abort()
            return
        if fault == "delay":
            await asyncio.sleep(self.delay_s)
            return
        if fault in ("429", "500", "503"):
            status = int(fault)
            headers = [("Content-Type", "application/json")]
            if status == 429:
                headers.append(("Retry-After", f"{self.retry_after:g}"))
            error = {"error": {"message": f"injected {status}", "type": "injected_fault", "code": status}}
            writer.write(_render_response(status, headers, json_body(error)))
            await writer.drain()
            return
        if fault == "empty":
            answer = {
                "id": "injected",
                "object": "chat.completion",
                "created": 0,
                "model": "x",
                "choices": [],
            }
            writer.write(_render_response(200, [("Content-Type", "application/json")], json_body(answer)))
            await writer.drain()
            return

        response = await self._server_answer(method, target, request, event["hash"])
        status = int(response.start_line.split(" ", 2)[1])
        event["status"] = status
        if fault == "truncate":
            body = response.body[: max(1, len(response.body) // 2)]
            writer.write(_render_response(status, response.headers, body))
        elif fault == "nonjson":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>upstream hiccup</body></html>"
            writer.write(_render_response(200, [("Content-Type", "text/html")], page))
        else:
            writer.write(_render_response(status, response.headers, response.body))
        await writer.drain()

    def _count_in_flight(self, change: int) -> None:
        with self._lock:
            self.server_in_flight += change
            self.in_flight_timeline.append((time.time(), self.server_in_flight))

    async def _server_answer(
        self, method: str, target: str, request: _HTTPMessage, digest: str
    ) -> _HTTPMessage:
        """The real server's answer, through the slow server when `slow_s` is set. Runs to the end
        whether or not the client still waits: nothing here watches the client's connection."""
        self._count_in_flight(+1)
        try:
            if not self.slow_s:
                return await self._forward(method, target, request, digest)
            if self._serial is None:
                self._serial = asyncio.Lock()
            async with self._serial:
                await asyncio.sleep(self.slow_s)
                return await self._forward(method, target, request, digest)
        finally:
            self._count_in_flight(-1)

    async def _forward(self, method: str, target: str, request: _HTTPMessage, digest: str) -> _HTTPMessage:
        up_reader, up_writer = await asyncio.open_connection(
            self.upstream_host, self.upstream_port, limit=1 << 24
        )
        try:
            lines = [f"{method} {target} HTTP/1.1", f"Host: {self.upstream_host}:{self.upstream_port}"]
            lines += [f"{k}: {v}" for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
            lines += [f"Content-Length: {len(request.body)}", "Connection: close"]
            up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            await up_writer.drain()
            with self._lock:
                self.forwarded[digest] += 1
                if digest not in self.bodies:
                    try:
                        self.bodies[digest] = json.loads(request.body)
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        self.bodies[digest] = request.body
            response = await _read_message(up_reader, is_response=True)
            if response is None:
                raise ConnectionError("upstream closed without a response")
            return response
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
