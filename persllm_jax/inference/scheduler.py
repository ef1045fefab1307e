"""Continuous batching: which requests run in the next model call, and what their tokens mean.

A fixed number of slots decode together. A request waits until a slot and the KV pages for its
prompt and token budget are free (pages of a cached prefix are shared, not taken anew; a request
that a row still prefilling will give at least half its prompt from the cache waits for that row),
then prefills in chunks of at most `prefill_chunk` tokens, several requests per call while the call's
`prefill_tokens` allow, so a long prompt never stalls the rows that are decoding: every `step()`
runs one decode call for the rows that have a token to feed, then one prefill call. A row's first
token is sampled from its last prompt chunk; it then decodes one token per step until an end of
turn, a stop string, its budget, or its client leaving, and its slot and pages are freed at once
for the next request. A row's samples depend only on its seed and how many tokens it has drawn,
never on which rows share its calls.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from persllm_jax.inference.kv_pages import OutOfPages, PagePool
from persllm_jax.inference.paged_forward import SCRATCH_PAGE
from persllm_jax.inference.sampling import SamplingParams
from persllm_jax.inference.text_stream import TextStream

log = logging.getLogger(__name__)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
# Attended lengths round up to 128 * (1, 1.5, 2, 3, 4, 6, ...) tokens: at most a third of a call's
# attention is over pages no row has written, with a handful of compiled shapes.
_LENGTH_UNIT = 128


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "cancelled"
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    first_logits: np.ndarray | None = None  # the logits of the first token, when asked for


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # text as it becomes final
    on_done: Callable[[Completion], None] | None = None
    cancelled: Callable[[], bool] | None = None  # polled every step
    on_dequeue: Callable[[], None] | None = None  # it got a slot, or left the queue cancelled
    on_error: Callable[[BaseException], None] | None = None  # a model call of its row failed
    keep_first_logits: bool = False


@dataclasses.dataclass(eq=False)
class _Row:
    request: Request
    slot: int
    pages: list[int]
    cached: int  # prompt tokens already in the cache when it joined
    budget: int  # most tokens it may generate
    stream: TextStream
    length: int = 0  # tokens whose keys and values are in its pages
    drawn: int = 0  # tokens sampled so far (the sampler's step)
    pending: int = -1  # the last sampled token, fed at the next decode
    first_logits: Any = None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt)


def _call(callback, *args) -> None:
    if callback is not None:
        callback(*args)


def round_up_length(n: int) -> int:
    size = _LENGTH_UNIT
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def batch_bucket(n: int) -> int:
    return next((b for b in _BATCH_BUCKETS if b >= n), -(-n // _BATCH_BUCKETS[-1]) * _BATCH_BUCKETS[-1])


@dataclasses.dataclass
class CallRows:
    """One model call's inputs, host side (see `Generator.run_call`)."""

    ids: np.ndarray  # [B, T]
    positions: np.ndarray  # [B, T]
    valid: np.ndarray  # [B, T]
    pages: np.ndarray  # [B, W] each row's pages from the block of its first position to the last written
    cached_pages: np.ndarray  # [B, N] its pages up to the last block cached before the call
    last: np.ndarray  # [B] index in T of the token whose logits sample the next one
    slots: np.ndarray  # [B] the row's slot (filler rows: the spare slot)
    emits: np.ndarray  # [B] the call samples a token for the row
    drawn: np.ndarray  # [B] the sampler's step per row
    params: list[SamplingParams]


class Scheduler:
    """Admits requests into slots and runs them one step at a time over two device functions:
    `run_call(call, greedy_only, keep_logits)` returns (tokens [B], logits [B, V] or None), and
    `reset_seen(slot, prompt)` starts a slot's record of seen tokens (the repetition penalty's)."""

    def __init__(
        self,
        run_call: Callable[[CallRows, bool, bool], tuple[np.ndarray, Any]],
        reset_seen: Callable[[int, list[int]], None],
        pool: PagePool,
        *,
        slots: int,
        max_length: int,
        eos_ids: frozenset[int],
        tokenizer,
        prefill_chunk: int = 512,
        prefill_tokens: int = 2048,
    ):
        self.run_call = run_call
        self.reset_seen = reset_seen
        self.pool = pool
        self.slots = slots
        self.max_length = max_length
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = max(prefill_tokens, prefill_chunk)
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Row] = []
        self._free_slots = list(range(slots))
        self.calls = 0

    # -- requests --------------------------------------------------------------------------------

    def check(self, prompt, params: SamplingParams, name: str = "the prompt") -> None:
        """Raise ValueError for a request no amount of waiting could serve."""
        if not prompt:
            raise ValueError(f"{name} is empty")
        if len(prompt) >= self.max_length:
            raise ValueError(
                f"{name} has {len(prompt)} tokens; the model allows {self.max_length} "
                "positions in all, prompt and completion together"
            )
        needed = -(-(len(prompt) + self._budget(prompt, params)) // self.pool.page_size)
        if needed > self.pool.capacity:
            raise ValueError(
                f"{name} and its budget need {needed} KV pages of {self.pool.page_size} tokens; "
                f"the cache has {self.pool.capacity} (raise the KV cache's memory budget)"
            )

    def _budget(self, prompt, params: SamplingParams) -> int:
        return min(params.max_new_tokens, self.max_length - len(prompt))

    def add(self, request: Request) -> None:
        self.check(request.prompt, request.params)
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def _admit(self) -> None:
        deferred: list[Request] = []
        try:
            # a deferred request keeps a slot for itself: it joins once its prefix is cached
            while self.waiting and len(self._free_slots) > len(deferred):
                request = self.waiting[0]
                if request.cancelled is not None and request.cancelled():
                    self.waiting.popleft()
                    _call(request.on_dequeue)
                    _call(request.on_done, Completion("", [], "cancelled", len(request.prompt)))
                    continue
                if self._prefix_in_flight(request.prompt):
                    deferred.append(self.waiting.popleft())
                    continue
                budget = self._budget(request.prompt, request.params)
                try:
                    pages, cached = self.pool.acquire(request.prompt, len(request.prompt) + budget)
                except OutOfPages:
                    break  # first come, first served: it waits for pages to free
                self.waiting.popleft()
                _call(request.on_dequeue)
                stream = TextStream(self.tokenizer, request.params.stop)
                row = _Row(request, self._free_slots.pop(0), pages, cached, budget, stream, length=cached)
                self.rows.append(row)
                self.reset_seen(row.slot, request.prompt)
        finally:
            self.waiting.extendleft(reversed(deferred))  # back at the head, in their order

    def _prefix_in_flight(self, prompt: list[int]) -> bool:
        """Whether a row still prefilling will cache at least half of what this prompt would
        compute now (its leading blocks beyond those cached). Such a request waits for that row's
        prefill to end, keeping a slot, then reads those blocks from the cache instead of computing
        them again: a burst of requests that share a long system prompt or an annotation prompt's
        instructions computes their common part once."""
        if not self.pool.prefix_cache or not any(row.prefilling for row in self.rows):
            return False
        page = self.pool.page_size
        cached = self.pool.cached_tokens(prompt)
        usable = (len(prompt) - 1) // page * page  # acquire shares all but the last token's block
        for row in self.rows:
            if not row.prefilling or row.prompt[:cached] != prompt[:cached]:
                continue  # its blocks are registered already, or it has other leading blocks
            end = min(usable, len(row.prompt) // page * page)
            common = cached
            while common < end and row.prompt[common : common + page] == prompt[common : common + page]:
                common += page
            if common > cached and 2 * (common - cached) >= len(prompt) - cached:
                return True
        return False

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        keep_first_logits: bool = False,
    ) -> list[Completion]:
        """Continue each token-id prompt (with whatever else is queued) until each is answered.
        `on_text(row, delta)` receives text as it becomes final; a row for which `cancelled(row)`
        turns true stops at the next step (finish "cancelled")."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self.check(list(prompt), p, name=f"prompt {i}")
        results: list[Completion | None] = [None] * len(prompts)

        def done(row: int, completion: Completion) -> None:
            results[row] = completion

        requests = [
            Request(
                list(prompt),
                p,
                on_text=functools.partial(on_text, row) if on_text else None,
                on_done=functools.partial(done, row),
                cancelled=functools.partial(cancelled, row) if cancelled else None,
                keep_first_logits=keep_first_logits,
            )
            for row, (prompt, p) in enumerate(zip(prompts, params))
        ]
        self.waiting.extend(requests)
        try:
            while any(r is None for r in results):
                self.step()
        except BaseException as err:
            self.abort(err)
            self.waiting = collections.deque(r for r in self.waiting if r not in requests)
            raise
        return results

    def drop_waiting(self, err: BaseException) -> None:
        """End every queued request with `err` (nothing will serve them)."""
        waiting, self.waiting = self.waiting, collections.deque()
        for request in waiting:
            _call(request.on_dequeue)
            _call(request.on_error, err)

    def abort(self, err: BaseException) -> int:
        """After a failed model call: end every row in a slot with `err` (their keys and values
        may be lost), keep the queue. Returns how many rows ended."""
        rows, self.rows = self.rows, []
        for row in rows:
            self.pool.release(row.pages)
            self._free_slots.append(row.slot)
        self._free_slots.sort()
        self.pool.clear_prefixes()
        for row in rows:
            _call(row.request.on_error, err)
        return len(rows)

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> None:
        """Admit what fits, run one decode call for the rows with a token to feed and one prefill
        call for rows still reading their prompts, and hand out their tokens."""
        for row in list(self.rows):
            if row.request.cancelled is not None and row.request.cancelled():
                self._finish(row, "cancelled")
        self._admit()
        decoding = [r for r in self.rows if not r.prefilling]
        if decoding:
            self._decode(decoding)
        self._admit()  # slots freed by the decode call
        prefilling = [r for r in self.rows if r.prefilling]
        if prefilling:
            self._prefill(prefilling)

    def _decode(self, rows: list[_Row]) -> None:
        call = self._call(
            rows,
            [[r.pending] for r in rows],
            [r.length for r in rows],
            [True] * len(rows),
            t=1,
        )
        tokens, _ = self._run(call, rows)
        for row, token in zip(rows, tokens):
            row.length += 1
            self._accept(row, int(token))

    def _prefill(self, rows: list[_Row]) -> None:
        chosen, pieces, budget = [], [], self.prefill_tokens
        for row in rows:
            take = min(len(row.prompt) - row.length, self.prefill_chunk, budget)
            if take <= 0:
                break
            chosen.append(row)
            pieces.append(row.prompt[row.length : row.length + take])
            budget -= take
        t = next((n for n in _PREFILL_LENGTHS if n >= max(map(len, pieces))), self.prefill_chunk)
        call = self._call(
            chosen,
            pieces,
            [r.length for r in chosen],
            [r.length + len(p) == len(r.prompt) for r, p in zip(chosen, pieces)],
            t=t,
        )
        tokens, logits = self._run(call, chosen)
        for i, (row, piece) in enumerate(zip(chosen, pieces)):
            row.length += len(piece)
            if row.prefilling:
                continue
            self.pool.register(row.prompt, row.pages)
            if row.request.keep_first_logits and logits is not None:
                row.first_logits = np.asarray(logits[i])
            self._accept(row, int(tokens[i]))

    def _call(self, rows, pieces, starts, emits, *, t: int) -> CallRows:
        b = batch_bucket(len(rows))
        page = self.pool.page_size
        # Attention reads the keys cached before the call from the pages (none for a prompt's
        # first chunk) and this call's keys from the call itself. The writes cover at most
        # ceil(t / page) + 1 blocks from the row's first written one: the cache write's shapes
        # depend on the batch and chunk sizes only, not on how much is cached.
        cached = max(starts)
        n = round_up_length(cached) // page if cached else 0
        w = -(-t // page) + 1
        call = CallRows(
            ids=np.zeros((b, t), np.int32),
            positions=np.zeros((b, t), np.int32),
            valid=np.zeros((b, t), bool),
            pages=np.full((b, w), SCRATCH_PAGE, np.int32),
            cached_pages=np.full((b, n), SCRATCH_PAGE, np.int32),
            last=np.zeros((b,), np.int32),
            slots=np.full((b,), self.slots, np.int32),  # the spare slot
            emits=np.zeros((b,), bool),
            drawn=np.zeros((b,), np.int32),
            params=[row.request.params for row in rows] + [SamplingParams()] * (b - len(rows)),
        )
        for i, (row, piece, start) in enumerate(zip(rows, pieces, starts)):
            k = len(piece)
            call.ids[i, :k] = piece
            # padding sits at the row's last real position: its query sees real keys only
            call.positions[i] = start + np.minimum(np.arange(t), k - 1)
            call.valid[i, :k] = True
            first = start // page
            written = row.pages[first : first + w]
            call.pages[i, : len(written)] = written
            read = row.pages[:n]
            call.cached_pages[i, : len(read)] = read
            call.last[i] = k - 1
            call.slots[i] = row.slot
            call.emits[i] = emits[i]
            call.drawn[i] = row.drawn
        return call

    def _run(self, call: CallRows, rows: list[_Row]):
        self.calls += 1
        greedy_only = all(r.request.params.temperature == 0 for r in rows)
        keep = any(r.request.keep_first_logits for r in rows)
        return self.run_call(call, greedy_only, keep)

    def _accept(self, row: _Row, token: int) -> None:
        """A token sampled for `row`: stream its text, or finish the row."""
        row.drawn += 1
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            row.stream.add(token)
            if row.stream.stopped:
                finish = "stop"
            elif len(row.stream.ids) >= row.budget:
                finish = "length"
        if row.request.on_text is not None:
            delta = row.stream.delta(final=finish is not None)
            if delta:
                row.request.on_text(delta)
        if finish is not None:
            self._finish(row, finish)
        else:
            row.pending = token

    def _finish(self, row: _Row, reason: str) -> None:
        self.rows.remove(row)
        self.pool.release(row.pages)
        self._free_slots.append(row.slot)
        self._free_slots.sort()
        completion = Completion(
            row.stream.text,
            row.stream.ids,
            reason,
            len(row.prompt),
            cached_tokens=row.cached,
            first_logits=row.first_logits,
        )
        _call(row.request.on_done, completion)
