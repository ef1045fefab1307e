"""Running `persllm sft` / `persllm dpo` in real subprocesses for the training tests: the runs,
their losses and parameters, and two-process jobs on loopback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from persllm_jax.llm.loopback import free_port
from persllm_jax.train.metrics_log import read_metrics
from tests.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "sft_tiny.yaml"
DPO = ROOT / "configs" / "dpo_tiny.yaml"
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def train(kind, run_dir, *overrides, env=None, check=True):
    config = SFT if kind == "sft" else DPO
    return run_cli(kind, "--config", config, f"run_dir={run_dir}", *overrides, env=env, check=check, cwd=ROOT)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def final_params(run_dir):
    import jax

    from persllm_jax import load_pretrained
    from persllm_jax.io.pretrained import params_tree

    model, _ = load_pretrained(run_dir)
    return {
        "/".join(map(str, k)): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(params_tree(model))[0]
    }


def assert_same_params(a, b, atol=0.0):
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], atol=atol, rtol=0, err_msg=key)


def _wait_for(predicate, process, timeout=600):
    start = time.time()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.returncode}\n{process.stderr.read()}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def _start(kind, run_dir, *overrides):
    config = SFT if kind == "sft" else DPO
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "persllm_jax.cli",
            kind,
            "--config",
            str(config),
            f"run_dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        env={**os.environ, **EIGHT_DEVICES},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _two_processes(run_dir, *overrides, wait=True):
    """`persllm sft` as two processes with 4 fake devices each, joined by jax.distributed on loopback."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    distributed = (
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
    )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "persllm_jax.cli",
                "sft",
                "--config",
                str(SFT),
                f"run_dir={run_dir}",
                *distributed,
                f"distributed.process_id={pid}",
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for pid in range(2)
    ]
    if not wait:
        return processes
    logs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        logs.append(err)
    return logs
