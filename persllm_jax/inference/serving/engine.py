"""The serving engine of `persllm serve`: `BatchEngine` and its `Job`, one per request.

A request is admitted in its handler: refused with 429 when `max_queue` requests already wait for
a slot, then its chat template is rendered and its length checked on a preparation thread (so a
bad request is answered at once and rendering never holds up decoding), and the prepared job is
queued. One worker thread (the only one that touches JAX) steps the generator's continuous-batching
scheduler: each step it takes every job queued since the last (when idle, it first waits
`batch_window_s` for company, so requests sent together prefill together), then runs one decode
and one prefill call; a job joins the running rows as soon as a slot and its KV pages are free,
and a finished or abandoned row frees them at once. Each job's events, the streamed text among
them, go back to its asyncio queue with `loop.call_soon_threadsafe`. A failed model call answers
its rows with 500 and the server goes on; if the worker dies, every waiting job and every later
request gets a 503 instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from persllm_jax.inference.serving.protocol import DEFAULT_MAX_TOKENS, ChatRequest, RequestError

log = logging.getLogger(__name__)

DEFAULT_BATCH_WINDOW_S = 0.015
DEFAULT_MAX_QUEUE = 64  # waiting requests before new ones get 429
RETRY_AFTER_S = 1


@dataclasses.dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    sent: str = ""  # streamed text so far
    ids: list[int] = dataclasses.field(default_factory=list)  # the rendered prompt
    params: Any = None  # its SamplingParams

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
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        warmup: bool = True,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._waiting = 0  # admitted, not yet taken into a batch
        self._waiting_lock = threading.Lock()
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="persllm-prepare")
        self.died: BaseException | None = None
        self.cancelled_rows = 0  # rows that stopped decoding because their client left
        self._load = load
        self.batch_window_s = batch_window_s
        self.default_max_tokens = default_max_tokens
        self.warmup = warmup
        self.generator = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.completed = 0  # requests answered

    @property
    def alive(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._ready.is_set()
            and self.died is None
        )

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
        self._prepare_pool.shutdown(wait=False)

    async def submit(self, request: ChatRequest) -> Job:
        """Admit a request: its job, prepared and queued. Raises RequestError: 429 when the queue
        is full, 503 when the worker is not running, 400 for a prompt that cannot be served."""
        if not self.alive:
            raise RequestError(503, "the generation worker is not running", type="server_error")
        with self._waiting_lock:
            if self._waiting >= self.max_queue:
                raise RequestError(
                    429,
                    f"the server has {self._waiting} requests waiting (--max-queue {self.max_queue}); "
                    f"retry after {RETRY_AFTER_S} s",
                    type="rate_limit_error",
                    retry_after=RETRY_AFTER_S,
                )
            self._waiting += 1
        job = Job(request, asyncio.get_running_loop(), asyncio.Queue())
        try:
            job.ids, job.params = await job.loop.run_in_executor(
                self._prepare_pool, self._prepare_checked, request
            )
        except BaseException:
            self._taken()
            raise
        self._queue.put(job)
        if self.died is not None:  # the worker died meanwhile: it will not take this job
            self._fail_waiting()
        return job

    def _taken(self) -> None:
        with self._waiting_lock:
            self._waiting -= 1

    def _prepare_checked(self, request: ChatRequest):
        try:
            return self._prepare(request)
        except RequestError:
            raise
        except Exception as err:  # a template that rejects the conversation, for one
            log.warning("could not prepare a request: %s", err)
            raise RequestError(400, f"could not render the messages: {err}", param="messages") from err

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
        try:
            self._serve()
        except BaseException as err:
            log.critical("the generation worker died: %r; requests now get 503", err)
            self.died = err
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Answer every queued job with 503 (the worker will not take them)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._taken()
                job.post(
                    "error",
                    RequestError(503, f"the generation worker died: {self.died!r}", type="server_error"),
                )

    def _warm_up(self) -> None:
        from persllm_jax.inference.generation import SamplingParams

        t0 = time.perf_counter()
        ids = self.generator.encode_chat([{"role": "user", "content": "Hello"}])
        self.generator.complete([ids], SamplingParams(max_new_tokens=2))
        log.info("warm-up generation done in %.1f s", time.perf_counter() - t0)

    def _serve(self) -> None:
        """Step the scheduler while it has work, adding queued jobs before every step; return on
        the stop signal."""
        scheduler = self.generator.scheduler
        while True:
            if not scheduler.busy:  # idle: wait for a job, then briefly for company
                job = self._queue.get()
                if job is None:
                    return
                self._add(job, scheduler)
                deadline = time.monotonic() + self.batch_window_s
                while (remaining := deadline - time.monotonic()) > 0:
                    try:
                        job = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._add(job, scheduler)
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self._add(job, scheduler)
            try:
                scheduler.step()
            except Exception as err:
                log.exception("a model call failed")
                failed = RequestError(500, f"generation failed: {err}", type="server_error")
                scheduler.abort(failed)
            except BaseException as err:  # the worker itself is going down: answer its jobs first
                died = RequestError(503, f"the generation worker died: {err!r}", type="server_error")
                scheduler.abort(died)
                scheduler.drop_waiting(died)
                raise

    def _add(self, job: Job, scheduler) -> None:
        from persllm_jax.inference.scheduler import Request

        started = time.perf_counter()

        def on_text(delta: str) -> None:
            if job.request.stream:
                job.sent += delta
                job.post("delta", delta)

        def on_dequeue() -> None:
            self._taken()

        def on_done(completion) -> None:
            if completion.finish_reason == "cancelled":
                self.cancelled_rows += 1
            self._log_done(job, completion, started)
            job.post("done", completion)

        job.post("start", len(job.ids))
        scheduler.add(
            Request(
                job.ids,
                job.params,
                on_text=on_text,
                on_done=on_done,
                cancelled=lambda: job.cancelled,
                on_dequeue=on_dequeue,
                on_error=lambda err: job.post("error", err),
            )
        )

    def _log_done(self, job: Job, completion, started: float) -> None:
        self.completed += 1
        stats = self.generator.scheduler.pool.stats
        seconds = time.perf_counter() - started
        log.info(
            "request %d: %d prompt tokens (%d from the prefix cache) + %d completion tokens in %.2f s, "
            "%s; %d running; prefix cache: %d of %d prompts hit, %d tokens saved",
            self.completed,
            completion.prompt_tokens,
            completion.cached_tokens,
            len(completion.token_ids),
            seconds,
            completion.finish_reason,
            len(self.generator.scheduler.rows),
            stats.hits,
            stats.lookups,
            stats.tokens_saved,
        )

    def _prepare(self, request: ChatRequest):
        from persllm_jax.inference.generation import SamplingParams

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
        try:
            self.generator.scheduler.check(ids, params, name="the request")
        except ValueError as err:
            raise RequestError(400, str(err), param="messages") from err
        return ids, params
