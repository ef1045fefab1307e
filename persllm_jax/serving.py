"""`persllm serve`: an OpenAI-compatible chat server over the JAX generator.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (plain and streamed), `GET /health`.

Requests are batched: handlers put jobs on a queue, and one worker thread (the only thread that
touches JAX or the tokenizer) takes the first waiting job, waits `batch_window_s` for more, up to
`max_batch`, and runs them as one `Generator.complete` call with per-row sampling settings.
Streamed text goes back to each request's asyncio queue with `loop.call_soon_threadsafe`.

From Python:
    serve(model_path, host, port)                   # blocking, like the CLI
    with ServerProcess(model_path) as server: ...   # `persllm serve` in a subprocess, ready on enter
    with ServerThread(generator) as server: ...     # in this process, with an already loaded model
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
DEFAULT_BATCH_WINDOW_S = 0.015
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
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Request parsing: everything that can be checked without the tokenizer.


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
    top_k = _integer(body, "top_k", 0)
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
        temperature=_number(body, "temperature", 1.0),  # OpenAI's default
        top_p=_number(body, "top_p", 1.0),
        top_k=top_k,
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        seed=seed % 2**31,  # any int64 is valid in OpenAI's API; PRNG seeds are 32-bit
        stop=tuple(s for s in stop if s),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


# ---------------------------------------------------------------------------------------------
# The batching worker.


@dataclasses.dataclass
class _Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    sent: str = ""  # streamed text so far, to reconcile with the final Completion

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class BatchEngine:
    """Owns the generator and the one thread that runs it.

    Each job's queue receives ("start", prompt_tokens) or ("error", RequestError) once its prompt has
    been checked, then ("delta", text)... and finally ("done", Completion) or ("error", RequestError).
    """

    def __init__(
        self,
        load: Callable[[], Any],
        *,
        max_batch: int = 16,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        warmup: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._load = load
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.default_max_tokens = default_max_tokens
        self.warmup = warmup
        self.generator = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.batches = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def start(self) -> BatchEngine:
        """Start the worker; return once the model is loaded (and warmed up), or raise its load error."""
        self._thread = threading.Thread(target=self._run, name="persllm-generate", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: ChatRequest) -> _Job:
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._queue.put(job)
        return job

    # ----- worker thread -----

    def _run(self) -> None:
        try:
            self.generator = self._load()
            if self.warmup:
                self._warm_up()
        except BaseException as err:  # handed to start(), which re-raises it in the caller's thread
            self._load_error = err
            self._ready.set()
            return
        self._ready.set()
        while True:
            batch = self._collect()
            if batch is None:
                return
            if batch:
                self._run_batch(batch)

    def _warm_up(self) -> None:
        from persllm_jax.generation import SamplingParams

        t0 = time.perf_counter()
        ids = self.generator.encode_chat([{"role": "user", "content": "Hello"}])
        self.generator.complete([ids], SamplingParams(max_new_tokens=2))
        log.info("warm-up generation done in %.1f s", time.perf_counter() - t0)

    def _collect(self) -> list[tuple[_Job, list[int], Any]] | None:
        """Wait for a job, then up to `batch_window_s` for more; checks each prompt as it arrives."""
        job = self._queue.get()
        if job is None:
            return None
        batch = []
        self._admit(job, batch)
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            self._admit(job, batch)
        return batch

    def _admit(self, job: _Job, batch: list) -> None:
        if job.cancelled:
            return
        try:
            ids, params = self._prepare(job.request)
        except RequestError as err:
            job.post("error", err)
            return
        except Exception as err:  # a template that rejects the conversation, for one
            log.warning("could not prepare a request: %s", err)
            job.post("error", RequestError(400, f"could not render the messages: {err}", param="messages"))
            return
        job.post("start", len(ids))
        batch.append((job, ids, params))

    def _prepare(self, request: ChatRequest):
        from persllm_jax.generation import SamplingParams

        ids = self.generator.encode_chat(request.messages)
        limit = self.generator.max_length
        room = limit - len(ids)
        if request.max_tokens is None:
            if room < 1:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, your messages "
                    f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                    param="messages",
                    code="context_length_exceeded",
                )
            max_new = min(self.default_max_tokens, room)
        else:
            max_new = request.max_tokens
            if max_new > room:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{len(ids) + max_new} tokens ({len(ids)} in the messages, {max_new} in the "
                    "completion). Please reduce the length of the messages or completion.",
                    param="messages",
                    code="context_length_exceeded",
                )
        try:
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                repetition_penalty=request.repetition_penalty,
                seed=request.seed,
                stop=request.stop,
            )
        except ValueError as err:
            raise RequestError(400, str(err)) from err
        return ids, params

    def _run_batch(self, batch: list[tuple[_Job, list[int], Any]]) -> None:
        jobs = [job for job, _, _ in batch]

        def on_text(row: int, delta: str) -> None:
            if delta and jobs[row].request.stream:
                jobs[row].sent += delta
                jobs[row].post("delta", delta)

        t0 = time.perf_counter()
        try:
            completions = self.generator.complete(
                [ids for _, ids, _ in batch], [p for _, _, p in batch], on_text
            )
        except Exception as err:
            log.exception("batch of %d failed", len(batch))
            for job in jobs:
                job.post("error", RequestError(500, f"generation failed: {err}", type="server_error"))
            return
        seconds = time.perf_counter() - t0
        self.batches += 1
        prompt = sum(c.prompt_tokens for c in completions)
        generated = sum(len(c.token_ids) for c in completions)
        log.info(
            "batch %d: %d request(s), %d prompt + %d completion tokens in %.2f s (%.1f tok/s)",
            self.batches,
            len(batch),
            prompt,
            generated,
            seconds,
            generated / max(seconds, 1e-9),
        )
        for job, completion in zip(jobs, completions):
            if job.request.stream and completion.text != job.sent:
                if completion.text.startswith(job.sent):
                    job.post("delta", completion.text[len(job.sent) :])
                else:
                    log.warning("streamed text differs from the final text of a completion")
            job.post("done", completion)


# ---------------------------------------------------------------------------------------------
# The HTTP app.


def _error_response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(engine: BatchEngine, model_name: str, aliases: Sequence[str] = ()):
    """The FastAPI app. `model_name` is the id clients see; `aliases` (the model path) are accepted too."""
    app = FastAPI(title="persllm serve")
    created = int(time.time())
    accepted = {model_name, *aliases}

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(RequestError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return _error_response(RequestError(400, str(exc)))

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "persllm"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in accepted:
            return _error_response(_unknown_model(model_id, model_name))
        return {"id": model_name, "object": "model", "created": created, "owned_by": "persllm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the request body is not valid JSON: {err}") from err
            if isinstance(body, dict) and body.get("model") not in (None, *accepted):
                raise _unknown_model(body["model"], model_name)
            chat = parse_request(body)
        except RequestError as err:
            return _error_response(err)
        if not engine.alive:
            return _error_response(
                RequestError(503, "the generation worker is not running", type="server_error")
            )

        job = engine.submit(chat)
        try:
            first = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if first[0] == "error":
            return _error_response(first[1])
        prompt_tokens = first[1]
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if chat.stream:
            return StreamingResponse(
                _stream(job, completion_id, now, model_name, prompt_tokens),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    return _error_response(event[1])
                if event[0] == "done":
                    break
        finally:
            job.cancelled = True  # harmless once done; skips the job if the client went away first
        completion = event[1]
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(completion),
        }

    return app


def _unknown_model(asked: Any, served: str) -> RequestError:
    return RequestError(
        404,
        f"The model {asked!r} does not exist on this server; it serves {served!r}",
        param="model",
        code="model_not_found",
    )


def _usage(completion) -> dict:
    generated = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
    }


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(
    job: _Job, completion_id: str, created: int, model_name: str, prompt_tokens: int
) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                # OpenAI's clients raise an APIError for an event that carries "error".
                yield _sse(event[1].body())
                break
            elif event[0] == "done":
                completion = event[1]
                yield chunk({}, completion.finish_reason)
                if job.request.include_usage:
                    usage = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": _usage(completion),
                    }
                    yield _sse(usage)
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled = True


# ---------------------------------------------------------------------------------------------
# Running it.


def default_model_name(model_path: str | os.PathLike) -> str:
    return Path(model_path).resolve().name


def _loader(model_path: str | os.PathLike, dtype: str, max_batch: int) -> Callable[[], Any]:
    def load():
        import jax.numpy as jnp

        from persllm_jax.generation import Generator
        from persllm_jax.loading import load_pretrained

        model, tokenizer = load_pretrained(model_path, dtype=jnp.dtype(dtype))
        if tokenizer is None:
            raise ValueError(f"{model_path} has no tokenizer; the server needs one and its chat template")
        return Generator(model, tokenizer, max_batch=max_batch)

    return load


def serve(
    model_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch: int = 16,
    *,
    dtype: str = "float32",
    batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    warmup: bool = True,
) -> None:
    """Load the model, then serve until SIGINT/SIGTERM. Raises the load error if the model cannot load."""
    import uvicorn

    if not Path(model_path).exists():
        raise FileNotFoundError(f"model path does not exist: {model_path}")
    name = model_name or default_model_name(model_path)
    engine = BatchEngine(
        _loader(model_path, dtype, max_batch),
        max_batch=max_batch,
        batch_window_s=batch_window_s,
        default_max_tokens=default_max_tokens,
        warmup=warmup,
    )
    t0 = time.perf_counter()
    engine.start()
    log.info(
        "loaded %s as %r in %.1f s; listening on http://%s:%d/v1",
        model_path,
        name,
        time.perf_counter() - t0,
        host,
        port,
    )
    app = create_app(engine, name, aliases=(str(model_path), str(Path(model_path).resolve())))
    try:
        # log_config=None: uvicorn's loggers go through the logging set up by the CLI.
        uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    finally:
        engine.stop(timeout=5)


def _get_json(url: str, timeout: float) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_ready(
    process: subprocess.Popen,
    probe: Callable[[], bool],
    *,
    name: str,
    timeout: float,
    log_tail: Callable[[], str],
) -> float:
    """Poll `probe` until it returns True; seconds waited. Raises with the log's tail if the
    process exits first or `timeout` passes. Connection errors of the probe count as not ready."""
    t0 = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{name} not ready in {timeout:.0f} s:\n{log_tail()}")
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if probe():
                return time.monotonic() - t0
        time.sleep(0.25)


def stop_process_group(process: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """SIGTERM the process group started with `start_new_session=True`, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class ServerProcess:
    """`persllm serve` in a subprocess on a free port; `start()` returns once `/health` answers.

        with ServerProcess("runs/sft") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")

    The server's output goes to `log_path` (a temporary file by default); `stop()` sends SIGTERM to
    its process group, then SIGKILL.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        model_name: str | None = None,
        max_batch: int = 16,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 600.0,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        self.model_path = str(Path(model_path).resolve())
        self.host = host
        self.port = port or free_port(host)
        self.model_name = model_name or default_model_name(model_path)
        self.max_batch = max_batch
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="persllm_serve_")) / "serve.log"
        )
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "persllm_jax.cli",
            "serve",
            self.model_path,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--model-name",
            self.model_name,
            "--max-batch",
            str(self.max_batch),
            *self.extra_args,
        ]

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        try:
            seconds = wait_until_ready(
                self.process,
                lambda: _get_json(f"{self.root_url}/health", timeout=2.0)[0] == 200,
                name="persllm serve",
                timeout=self.startup_timeout,
                log_tail=self.log_tail,
            )
        except BaseException:
            self.stop()
            raise
        log.info("persllm serve ready at %s after %.1f s", self.base_url, seconds)
        return self

    def stop(self, grace_s: float = 15.0) -> None:
        process, self.process = self.process, None
        stop_process_group(process, grace_s)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerThread:
    """The server in a background thread of this process, around an already built `Generator`.

    Only the server's worker thread may use JAX while it runs, so the caller should not generate
    with the same model meanwhile.
    """

    def __init__(
        self,
        generator,
        *,
        model_name: str = "persllm",
        host: str = "127.0.0.1",
        port: int | None = None,
        max_batch: int | None = None,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.model_name = model_name
        self.engine = BatchEngine(
            lambda: generator,
            max_batch=max_batch or getattr(generator, "max_batch", 16),
            batch_window_s=batch_window_s,
            default_max_tokens=default_max_tokens,
            warmup=False,
        )
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> ServerThread:
        import uvicorn

        self.engine.start()
        config = uvicorn.Config(
            create_app(self.engine, self.model_name), host=self.host, port=self.port, log_config=None
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="persllm-serve", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.engine.stop()
        self._server = self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
