"""Running `persllm serve`: `serve` (blocking, like the CLI), `ServerProcess` (the command in a
subprocess on a free loopback port) and `ServerThread` (the server in a thread of this process,
around an already loaded generator); `default_model_name`, the id a model path is served under.

    serve(model_path, host, port)                   # blocking, like the CLI
    with ServerProcess(model_path) as server: ...   # `persllm serve` in a subprocess, ready on enter
    with ServerThread(generator) as server: ...     # in this process, with an already loaded model
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from persllm_jax.inference.serving.app import create_app
from persllm_jax.inference.serving.engine import DEFAULT_BATCH_WINDOW_S, DEFAULT_MAX_QUEUE, BatchEngine
from persllm_jax.inference.serving.protocol import DEFAULT_MAX_TOKENS
from persllm_jax.llm.loopback import LoopbackServer, free_port

log = logging.getLogger(__name__)


def default_model_name(model_path: str | os.PathLike) -> str:
    return Path(model_path).resolve().name


def _loader(
    model_path: str | os.PathLike, dtype: str, max_batch: int, kv_cache_gib: float | None, prefix_cache: bool
) -> Callable[[], Any]:
    def load():
        import jax.numpy as jnp

        from persllm_jax.inference.generation import Generator
        from persllm_jax.io.pretrained import load_pretrained

        model, tokenizer = load_pretrained(model_path, dtype=jnp.dtype(dtype))
        if tokenizer is None:
            raise ValueError(f"{model_path} has no tokenizer; the server needs one and its chat template")
        generator = Generator(
            model, tokenizer, max_batch=max_batch, kv_cache_gib=kv_cache_gib, prefix_cache=prefix_cache
        )
        log.info(
            "%d decode slots, KV cache of %.2f GiB (%d pages of %d tokens), prefix cache %s",
            max_batch,
            generator.kv_cache_bytes / 2**30,
            generator.pages.capacity,
            generator.pages.page_size,
            "on" if prefix_cache else "off",
        )
        return generator

    return load


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch: int = 16,
    *,
    dtype: str = "float32",
    batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    warmup: bool = True,
    max_queue: int = DEFAULT_MAX_QUEUE,
    api_key: str | None = None,
    docs: bool = False,
    kv_cache_gib: float | None = None,
    prefix_cache: bool = True,
    ui: bool | None = None,
    personas_dir: str | os.PathLike | None = None,
) -> None:
    """Load the model, then serve until SIGINT/SIGTERM. `ui` (default: on when `host` is loopback)
    serves the chat page at `/` with the personas of `personas_dir` (found as `persllm chat` finds
    it by default). Raises the load error if the model cannot load."""
    import uvicorn

    if not Path(model_path).exists():
        raise FileNotFoundError(f"model path does not exist: {model_path}")
    if not api_key and not is_loopback(host):
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the model; "
            "set --api-key or PERSLLM_API_KEY",
            host,
        )
    name = model_name or default_model_name(model_path)
    page_personas = None
    if ui if ui is not None else is_loopback(host):
        from persllm_jax.personas.prompts import resolve_personas_dir

        page_personas = resolve_personas_dir(personas_dir)
        if not page_personas.is_dir():
            raise FileNotFoundError(f"personas directory for the chat page does not exist: {page_personas}")
    engine = BatchEngine(
        _loader(model_path, dtype, max_batch, kv_cache_gib, prefix_cache),
        batch_window_s=batch_window_s,
        default_max_tokens=default_max_tokens,
        warmup=warmup,
        max_queue=max_queue,
    )
    t0 = time.perf_counter()
    engine.start()
    log.info(
        "loaded %s as %r in %.1f s; listening on http://%s:%d/v1",
        model_path,
        name,
        time.perf_counter() - t0,
        host,
        port,
    )
    aliases = (str(model_path), str(Path(model_path).resolve()))
    app = create_app(engine, name, aliases=aliases, api_key=api_key, docs=docs, personas_dir=page_personas)
    if page_personas is not None:
        log.info("chat page: http://%s:%d/ (personas from %s)", host, port, page_personas)
    try:
        # log_config=None: uvicorn's loggers go through the logging set up by the CLI.
        uvicorn.run(app, host=host, port=port, log_config=None, timeout_graceful_shutdown=5)
    finally:
        engine.stop(timeout=5)


class ServerProcess(LoopbackServer):
    """`persllm serve` in a subprocess on a free port; `start()` returns once `/health` answers.

        with ServerProcess("runs/sft") as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")

    The server's output goes to `log_path` (a temporary file by default; if given, overwritten unless
    `append_log`); `stop()` sends SIGTERM to its process group, then SIGKILL.
    """

    name = "persllm serve"
    log_prefix = "persllm_serve_"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        model_name: str | None = None,
        max_batch: int = 16,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 600.0,
        log_path: str | os.PathLike | None = None,
        append_log: bool = False,
        env: dict[str, str] | None = None,
    ):
        super().__init__(
            host=host,
            port=port,
            startup_timeout=startup_timeout,
            log_path=log_path,
            append_log=append_log,
            env=env,
        )
        self.model_path = str(Path(model_path).resolve())
        self.model_name = model_name or default_model_name(model_path)
        self.max_batch = max_batch
        self.extra_args = list(extra_args)

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "persllm_jax.cli",
            "serve",
            self.model_path,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--model-name",
            self.model_name,
            "--max-batch",
            str(self.max_batch),
            *self.extra_args,
        ]


class ServerThread:
    """The server in a background thread of this process, around an already built `Generator`.

    Only the server's worker thread may use JAX while it runs, so the caller should not generate
    with the same model meanwhile.
    """

    def __init__(
        self,
        generator,
        *,
        model_name: str = "persllm",
        host: str = "127.0.0.1",
        port: int | None = None,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        api_key: str | None = None,
        personas_dir: str | os.PathLike | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.model_name = model_name
        self.api_key = api_key
        self.personas_dir = Path(personas_dir) if personas_dir is not None else None
        self.engine = BatchEngine(
            lambda: generator,
            batch_window_s=batch_window_s,
            default_max_tokens=default_max_tokens,
            warmup=False,
            max_queue=max_queue,
        )
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 60.0) -> ServerThread:
        import uvicorn

        self.engine.start()
        config = uvicorn.Config(
            create_app(self.engine, self.model_name, api_key=self.api_key, personas_dir=self.personas_dir),
            host=self.host,
            port=self.port,
            log_config=None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="persllm-serve", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.engine.stop()
        self._server = self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
