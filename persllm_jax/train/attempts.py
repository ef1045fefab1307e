"""What a run directory remembers of the process training in it, so that a process killed without
a word (SIGKILL, most often from the kernel's out-of-memory killer, or a machine that stopped) is
diagnosed by the next one: `attempt.json` is written when training starts, updated after every
step with the step and the process's peak memory so far, and marked ended on any exit Python sees
(finished, stopped, preempted, an error). One still marked running when a new process starts was
ended by something Python never saw.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "attempt.json"


def peak_memory_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def of_the_machine() -> str:
    """` of the machine's 23.4 GiB`, to follow a peak memory figure; empty where the machine's
    memory cannot be read."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return ""
    return f" of the machine's {memory:.1f} GiB"


def this_command() -> str:
    """The command line of this process, as a user would type it again."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cli.py", "__main__.py"):
        argv = ["persllm", *argv[1:]]
    elif argv:
        argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def killed_cause(signal_name: str) -> str:
    """What most likely sent a signal that ended a training process."""
    causes = {
        "SIGKILL": "most likely the kernel's out-of-memory killer (the machine ran out of memory); "
        "a job scheduler's hard limit or `kill -9` send it too",
        "SIGTERM": "a stop request from outside (a preemption, a job scheduler, `kill`)",
        "SIGINT": "an interrupt (Ctrl-C)",
        "SIGSEGV": "a crash in native code",
        "SIGABRT": "an abort in native code",
    }
    return causes.get(signal_name, "a signal from outside the process")


class Attempt:
    """`with Attempt(run_dir, command) as attempt: ... attempt.step_done(step)` around training."""

    def __init__(self, run_dir: Path, enabled: bool = True, command: str | None = None):
        self.path = Path(run_dir) / FILE
        self.enabled = enabled
        self.record = {
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or this_command(),
            "started": time.time(),
            "step": None,
            "peak_memory_gib": round(peak_memory_gib(), 2),
        }

    def previous(self) -> dict | None:
        """The record of an earlier process that did not end as Python sees an end, if any."""
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("status") == "running" else None

    def __enter__(self) -> Attempt:
        if not self.enabled:
            return self
        earlier = self.previous()
        if earlier is not None:
            log.warning("%s", diagnosis(earlier))
        self._write()
        return self

    def step_done(self, step: int) -> None:
        if self.enabled:
            self.record.update(step=step, peak_memory_gib=round(peak_memory_gib(), 2))
            self._write()

    def __exit__(self, kind, error, traceback) -> None:
        if not self.enabled:
            return
        self.record.update(
            status="ended",
            ended=time.time(),
            peak_memory_gib=round(peak_memory_gib(), 2),
            error=None if error is None else f"{kind.__name__}: {error}",
        )
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(self.path)


def diagnosis(earlier: dict) -> str:
    """What a new process says of an earlier one that vanished mid-run."""
    step = earlier.get("step")
    where = f"after step {step}" if step is not None else "before its first step"
    peak = earlier.get("peak_memory_gib")
    reached = f" (its peak memory was {peak} GiB{of_the_machine()})" if peak is not None else ""
    return (
        f"the previous training process here (pid {earlier.get('pid')} on {earlier.get('host')}) "
        f"stopped {where} without exiting: it was killed, most likely with SIGKILL by the kernel's "
        f"out-of-memory killer{reached}, or its machine stopped; this process resumes from the last "
        "checkpoint"
    )
