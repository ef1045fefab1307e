"""A preemption notice (SIGTERM: what TPU VMs, GKE and SLURM send before they take the machines
back) becomes a checkpoint at the end of a step, then a clean exit; the same command resumes.

One process: a Python signal handler sets a flag that the loop reads between steps. Several
processes: JAX's coordination service (started by `jax.distributed.initialize`) catches the
signal on whichever host gets it, tells the others in the background, and agrees on one step at
which every process saves; `multihost_utils.reached_preemption_sync_point` says when that step
has come. No collective runs per step for this.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preemption:
    """Use as a context around the training loop; ask `reached(step)` after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._coordinated = False

    def __enter__(self):
        # With a coordination service its preemption notifier owns SIGTERM; a Python handler
        # installed now would take the signal away from it.
        if jax.process_count() > 1:
            self._coordinated = bool(jax.config.jax_enable_preemption_service)
            if not self._coordinated:
                log.warning(
                    "jax_enable_preemption_service is off: SIGTERM ends this job without a checkpoint"
                )
        else:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no signal handling
                self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """True at the step where every process saves and stops. Must be called by every
        process at every step, with increasing `step`."""
        if not self._coordinated:
            return self.requested
        if multihost_utils.reached_preemption_sync_point(step):
            log.warning("preemption notice: every process saves a checkpoint at step %d, then exits", step)
            return True
        return False
