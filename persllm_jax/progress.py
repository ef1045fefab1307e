"""Progress of a long stage: a tqdm bar on a terminal; elsewhere (a log file, a pipeline's pipe) one
plain line when the stage starts and then one every `every_s` seconds and at its end, each with the
rate and the time left, so a log holds readable lines and no carriage-return debris. A line is due
every `every_s` seconds whether or not work finished meanwhile: a stage waiting on its first batch
(a CPU server answering 16 requests at once, a step compiling) still shows it is alive.

The foreign bars of the libraries we call (transformers, Hugging Face Hub, TFDS, tqdm itself) are
switched off off a terminal by `quiet_foreign_bars`, which the command line calls first.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("persllm.progress")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def quiet_foreign_bars() -> None:
    """Off a terminal, tell the libraries that draw their own bars not to (set before they load;
    the settings reach the processes this one starts, whose output goes to a log too)."""
    if on_terminal():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """`with Progress(total, "answers", unit="req") as bar: ... bar.update(1)`, as tqdm's subset."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        every_s: float = 30.0,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.start_n, self.every_s, self.postfix = initial, every_s, ""
        self.disabled = disable
        self.bar = None
        self.started = self.last = time.monotonic()
        self._lock = threading.Lock()  # update() and the heartbeat both write lines
        self._closed = threading.Event()
        if disable:
            return
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
        else:
            self._line("started")
            threading.Thread(target=self._heartbeat, name=f"progress: {desc}", daemon=True).start()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._line_if_due()

    def _heartbeat(self) -> None:
        """A line when `every_s` seconds pass with none written, until the stage closes."""
        while not self._closed.wait(max(self.every_s - (time.monotonic() - self.last), 0.01)):
            self._line_if_due()

    def _line_if_due(self) -> None:
        with self._lock:
            finished = self.total is not None and self.n >= self.total  # the done line follows
            if not self.disabled and not finished and time.monotonic() - self.last >= self.every_s:
                self._line()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(refresh=refresh, **values)

    def close(self) -> None:
        self._closed.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            return
        with self._lock:
            if not self.disabled:
                self._line("done")
                self.disabled = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, state: str = "") -> str:
        """The plain progress line: `answers: 40/120 (33%), 2.1 req/s, 00:19 elapsed, 00:38 left, hits 3`;
        the last one says `done` in place of the time left."""
        elapsed = time.monotonic() - self.started
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total}" if self.total else f"{self.n}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if state == "started":
            parts.append("started")
        else:
            parts.append(f"{rate:.3g} {self.unit}/s, {_clock(elapsed)} elapsed")
            if state == "done":
                parts.append("done")
            elif self.total:
                parts.append(
                    f"{_clock((self.total - self.n) / rate)} left" if rate > 0 else "time left unknown"
                )
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _line(self, state: str = "") -> None:
        self.last = time.monotonic()
        log.info("%s", self.line(state))
