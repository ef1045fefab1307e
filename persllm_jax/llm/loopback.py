"""HTTP servers run as subprocesses on loopback: `free_port`, `get_json`, `wait_until_ready`,
`stop_process_group`, and `LoopbackServer`, the base of the `persllm serve` and `transformers serve`
wrappers (start on a free port, output to a log file, ready once a probe answers 200)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float) -> tuple[int, Any]:
    """(status, parsed JSON body) of a GET; an HTTP error status comes back with None as its body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, None


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
        # ValueError: a body that is not JSON yet; AttributeError: JSON of an unexpected shape.
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


class LoopbackServer:
    """A subprocess serving HTTP on `host:port` (a free port by default), its output in `log_path`.

    `start()` returns once `ready()` (by default: GET `probe_path` answers 200) holds, or raises
    with the log's tail if the process exits or `startup_timeout` passes; `startup_s` is the time
    from spawning to ready. `stop()` sends SIGTERM to its process group, then SIGKILL. A subclass
    gives `command` and may change the class attributes below.

        with SomeServer(...) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")
    """

    name = "server"  # in errors and logs
    probe_path = "/health"
    probe_timeout = 2.0
    stop_grace_s = 15.0
    log_prefix = "loopback_"  # of the temporary folder that holds the log when no log_path is given

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 600.0,
        log_path: str | os.PathLike | None = None,
        append_log: bool = False,
        env: dict[str, str] | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix=self.log_prefix)) / "serve.log"
        )
        self.append_log = append_log
        self.env = env
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def command(self) -> list[str]:
        raise NotImplementedError

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

    def ready(self) -> bool:
        return get_json(f"{self.root_url}{self.probe_path}", timeout=self.probe_timeout)[0] == 200

    def start(self) -> LoopbackServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab" if self.append_log else "wb") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,
            )
        try:
            wait_until_ready(
                self.process, self.ready, name=self.name, timeout=self.startup_timeout, log_tail=self.log_tail
            )
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        log.info("%s ready at %s after %.1f s", self.name, self.base_url, self.startup_s)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        process, self.process = self.process, None
        stop_process_group(process, self.stop_grace_s if grace_s is None else grace_s)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
