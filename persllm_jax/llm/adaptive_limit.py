"""How many requests a client keeps on the wire: additive increase, multiplicative decrease.

A server that is saturated answers slowly; a request that times out is sent again while the
server still computes the first copy, so a fixed concurrency turns overload into a retry storm
that multiplies the server's work. `AdaptiveLimit` starts at the configured concurrency (the
ceiling), halves the limit when a request times out or the server says it is overloaded (429,
503), at most once for the requests that were already on the wire then, and raises it by one
after as many answers in a row as the limit. It never climbs back to a limit that overloaded the
server: each overload lowers the ceiling to one below the limit it happened at, so the limit
settles under what the server can take instead of probing past it again and again.

A slow answer is a sign of overload as soon as it is late (`overloaded`), while the request is
still on the wire and keeps its slot; requests admitted under an older, higher limit drain before
new ones start. The limit counts as settled from the moment the requests on the wire are within it
after its last cut (`settled_since`, a wall-clock time).
"""

from __future__ import annotations

import asyncio
import time


class AdaptiveLimit:
    def __init__(self, ceiling: int, adaptive: bool = True):
        if ceiling < 1:
            raise ValueError("concurrency must be >= 1")
        self.adaptive = adaptive  # False: a fixed limit (the ceiling), as a plain semaphore
        self.ceiling = self.ceiling_now = self.limit = self.lowest = ceiling
        self.in_flight = self.max_in_flight = 0
        self.decreases = 0
        self._answered_in_a_row = 0
        self._last_decrease = float("-inf")
        self._condition: asyncio.Condition | None = None
        self.settled_since: float | None = time.time()

    async def acquire(self) -> float:
        """Wait for a free slot; returns the request's start time for `release`."""
        if self._condition is None:
            self._condition = asyncio.Condition()
        async with self._condition:
            await self._condition.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return time.monotonic()

    async def overloaded(self, started: float) -> None:
        """A request that began at `started` is still on the wire but already late: cut the limit."""
        async with self._lock():
            self._cut(started)

    async def release(self, started: float, overloaded: bool, signalled: bool = False) -> None:
        """A request that began at `started` ended: answered (or failed for another reason), or
        with a sign of overload. `signalled`: its lateness was already counted by `overloaded`."""
        async with self._lock():
            self.in_flight -= 1
            if overloaded:
                self._cut(started)
            elif self.adaptive and not signalled:
                self._answered_in_a_row += 1
                if self._answered_in_a_row >= self.limit and self.limit < self.ceiling_now:
                    self.limit += 1
                    self._answered_in_a_row = 0
            if self.settled_since is None and self.in_flight <= self.limit:
                self.settled_since = time.time()
            self._condition.notify_all()

    def _lock(self) -> asyncio.Condition:
        assert self._condition is not None, "acquire a slot first"
        return self._condition

    def _cut(self, started: float) -> None:
        self._answered_in_a_row = 0
        # Requests already on the wire when the limit was last cut say nothing new.
        if not self.adaptive or started <= self._last_decrease:
            return
        self.ceiling_now = max(1, min(self.ceiling_now, self.limit - 1))
        self.limit = max(1, self.limit // 2)
        self.lowest = min(self.lowest, self.limit)
        self.decreases += 1
        self._last_decrease = time.monotonic()
        if self.in_flight > self.limit:
            self.settled_since = None

    def stats(self) -> dict:
        return {
            "concurrency_limit": self.ceiling,
            "concurrency_settled": self.limit,
            "concurrency_lowest": self.lowest,
            "concurrency_decreases": self.decreases,
            "max_in_flight": self.max_in_flight,
            "concurrency_settled_since": self.settled_since,
        }
