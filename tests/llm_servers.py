"""Real OpenAI-compatible servers for tests: `transformers serve`, as the tests start it.

`TransformersServer` is `persllm_jax.llm.transformers_server.TransformersServer` (the real CLI, offline, on
loopback, pinned to a local HF directory) that also waits for `/v1/models` to list the model and for a
1-token chat request to answer, and measures throughput. Requests must name the model as the same path
string in their `model` field (or omit it): any other name is answered 400 "Server is pinned to ...".
Without FORCE_MODEL, a request whose `model` is an existing local path also works (the server loads it on
first use), but then the first request pays the load. The server rejects unknown body fields with 422.

The fault-injecting proxy that tests put in front of it is `tests.fault_proxy.FaultProxy`.

`python -m tests.llm_servers run-batch SPEC.json` runs `LLMClient.complete_many` from a JSON spec: the
killed-and-resumed test runs it in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from persllm_jax.llm import transformers_server
from persllm_jax.llm.loopback import get_json

# ---------------------------------------------------------------------------------------------------------
# transformers serve
# ---------------------------------------------------------------------------------------------------------


def _http_json(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode("utf-8", "replace")


class TransformersServer(transformers_server.TransformersServer):
    """The real `transformers serve`, pinned to a local HF model directory, on a free loopback port.

    `start()` waits until `/v1/models` lists the model and a 1-token chat request answers; `startup_s` is
    the time from spawning the process to `/v1/models` answering, `ready_s` adds the warm-up request.
    `stop()` kills the whole process group (SIGTERM, then SIGKILL).
    """

    name = "`transformers serve`"
    probe_timeout = 2.0
    stop_grace_s = 10.0

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        startup_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        **kwargs,
    ):
        env = {"TOKENIZERS_PARALLELISM": "false", **(env or {})}
        super().__init__(model_dir, startup_timeout=startup_timeout, env=env, **kwargs)
        self.ready_s: float | None = None

    def ready(self) -> bool:
        status, answer = get_json(f"{self.base_url}/models", timeout=self.probe_timeout)
        return status == 200 and any(m.get("id") == self.model for m in answer.get("data", []))

    def start(self) -> TransformersServer:
        t0 = time.monotonic()
        super().start()
        try:
            status, answer = _http_json(
                f"{self.base_url}/chat/completions",
                {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                timeout=max(5.0, self.startup_timeout - (time.monotonic() - t0)),
            )
            if status != 200:
                raise RuntimeError(f"warm-up chat request answered {status}: {answer}")
            self.ready_s = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def measure_throughput(self, n: int = 3, max_tokens: int = 32) -> dict:
        """Sequential greedy chat requests; completion tokens per wall second."""
        tokens = 0
        t0 = time.monotonic()
        for i in range(n):
            status, answer = _http_json(
                f"{self.base_url}/chat/completions",
                {
                    "model": self.model,
                    "messages": [{"role": "user", "content": f"Write a short story about the number {i}."}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
                timeout=300,
            )
            assert status == 200, answer
            tokens += answer["usage"]["completion_tokens"]
        seconds = time.monotonic() - t0
        return {
            "requests": n,
            "completion_tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
        }


# ---------------------------------------------------------------------------------------------------------
# `python -m tests.llm_servers run-batch SPEC.json`: complete_many in a process of its own
# ---------------------------------------------------------------------------------------------------------


async def _run_batch(spec: dict) -> dict:
    from persllm_jax.llm.client import LLMClient

    async with LLMClient(
        spec["base_url"], spec["model"], spec["cache_dir"], **spec.get("client", {})
    ) as client:
        results = await client.complete_many(spec["requests"], progress_desc="batch", progress=False)
        return {"stats": client.stats(), "ok": sum(r.ok for r in results)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "run-batch":
        print("usage: python -m tests.llm_servers run-batch SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    print(json.dumps(asyncio.run(_run_batch(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
