"""Helpers of `train_throughput.py` that its parent process and all its children share: the model
config loaded without the package, the run's dtype, the random token batch, memory (peak RSS, the
host's available memory), the CPU load of other processes and the step timer built on it.

Only the standard library is imported at module level (numpy inside the one function that needs
it): the parent and the TRL children import this module, and neither may pull in JAX.
"""

from __future__ import annotations

import importlib.util
import math
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The model and its inputs.


def model_config_module():
    """persllm_jax/model/config.py, presets.py and hf_config.py loaded on their own, as one namespace:
    the TRL children need the presets and `to_hf_config` without importing the package (and with
    it JAX) into the torch process. The config module is registered under its own name first, so
    the other two find it there instead of importing the package."""
    import types

    namespace = {}
    for name in ("config", "presets", "hf_config"):
        full = f"persllm_jax.model.{name}"
        module = sys.modules.get(full)
        if module is None:
            spec = importlib.util.spec_from_file_location(full, ROOT / "persllm_jax" / "model" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module  # dataclasses look their module up while building the class
            spec.loader.exec_module(module)
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    return types.SimpleNamespace(**namespace)


def resolve_dtype(dtype: str, platform: str, model: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if platform == "gpu" and model in ("llama3_1b", "llama3_8b") else "float32"


def random_tokens(batch: int, length: int, vocab: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Memory.


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def host_memory_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# Timing, and the other processes that disturb it.


class OtherLoad:
    """The share of the host's CPU time that other processes used between start() and stop()
    (Linux; None elsewhere): timings on a busy machine are not comparable. `own_cpu_s` is this
    process's CPU time (all threads) over the same span, which a busy host disturbs less."""

    def __init__(self):
        self.begin = None
        self.other = self.own_cpu_s = None

    @staticmethod
    def _sample():
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        busy = sum(ticks) - ticks[3] - ticks[4]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12]), time.perf_counter()  # utime + stime of all threads

    def start(self):
        try:
            self.begin = self._sample()
        except (OSError, IndexError, ValueError):
            self.begin = None

    def stop(self):
        if self.begin is None:
            return None
        busy, own, now = self._sample()
        tick = os.sysconf("SC_CLK_TCK")
        self.own_cpu_s = (own - self.begin[1]) / tick
        capacity = (now - self.begin[2]) * tick * (os.cpu_count() or 1)
        self.other = max(0.0, (busy - self.begin[0]) - (own - self.begin[1])) / max(capacity, 1e-9)
        return self.other


def load_result(load: OtherLoad, steps: int, per_step: list) -> dict:
    cpu = None if load.own_cpu_s is None else load.own_cpu_s / steps
    return {"other_cpu_load": load.other, "cpu_s_per_step": cpu, "step_other_load": per_step}


def time_steps(run_step, state, warmup: int, steps: int, block):
    """Run warmup + steps steps; returns (state, per-step seconds, losses, (the timed steps'
    OtherLoad, each step's share of the CPU used by other processes))."""
    times, losses, load, per_step = [], [], OtherLoad(), []
    for i in range(warmup + steps):
        if i == warmup:
            load.start()
        step_load = OtherLoad()
        step_load.start()
        start = time.perf_counter()
        state, loss = run_step(state)
        block(state, loss)
        times.append(time.perf_counter() - start)
        per_step.append(step_load.stop())
        losses.append(float(loss))
    load.stop()
    return state, times, losses, (load, per_step)


def wait_idle(limit_s: float) -> None:
    """Wait (at most limit_s) until other processes use under 10% of the CPU over 2 s."""
    start = time.perf_counter()
    said = -math.inf
    while time.perf_counter() < start + limit_s:
        load = OtherLoad()
        load.start()
        time.sleep(2.0)
        busy = load.stop()
        if busy is None or busy < 0.10:
            return
        if time.perf_counter() - said > 60:
            said = time.perf_counter()
            print(f"    host busy ({busy:.0%} CPU used by others); waiting", file=sys.stderr, flush=True)
    print(f"    host still busy after {limit_s:.0f} s; measuring anyway", file=sys.stderr, flush=True)
