"""Running the real `persllm` command in a subprocess."""

import os
import subprocess
import sys


def run_cli(*args, env=None, check=True, timeout=900, cwd=None, replace_env=False):
    """`persllm ARGS` in a subprocess; `env` adds to this process's environment, or with
    `replace_env` is the whole environment."""
    full_env = dict(env or {}) if replace_env else {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "persllm_jax.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"persllm {args} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def user_environment() -> dict:
    """This process's environment without the tests' own JAX and TPU settings (conftest.py), as a
    user's shell has it."""
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES")}
