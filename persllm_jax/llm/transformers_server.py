"""`transformers serve` on loopback: `TransformersServer`, the reference OpenAI-compatible server of
Hugging Face transformers pinned offline to one local HF model directory, ready once `/v1/models`
answers; `transformers_cli`, the command that runs it; `OFFLINE_ENV`, the flags that keep it offline.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        transformers serve /abs/path/to/hf_dir --host 127.0.0.1 --port PORT --device cpu

The directory is the positional FORCE_MODEL argument (transformers 5.x has no `--force-model` flag):
the server loads it before it starts listening and lists it, and accepts it in requests' `model`
field, under that exact path string.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from persllm_jax.llm.loopback import LoopbackServer

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def transformers_cli() -> list[str]:
    """The `transformers` console script of this interpreter's environment (or its module entry point)."""
    script = Path(sys.executable).parent / "transformers"
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.exit(main())",
    ]


class TransformersServer(LoopbackServer):
    """`transformers serve` pinned to `model_dir`, on a free loopback port (see `LoopbackServer`).

    `model` (also `model_name`) is the resolved directory: the id requests name the model by.
    `env` is added to `OFFLINE_ENV`; `append_log` keeps what an earlier run wrote to `log_path`.
    """

    name = "transformers serve"
    probe_path = "/v1/models"
    probe_timeout = 5.0
    log_prefix = "tserve_"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        device: str = "cpu",
        startup_timeout: float = 600.0,
        log_path: str | os.PathLike | None = None,
        append_log: bool = False,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ):
        super().__init__(
            host=host,
            port=port,
            startup_timeout=startup_timeout,
            log_path=log_path,
            append_log=append_log,
            env={**OFFLINE_ENV, **(env or {})},
        )
        self.model = str(Path(model_dir).resolve())
        self.device = device
        self.extra_args = list(extra_args)

    @property
    def model_name(self) -> str:
        return self.model

    @property
    def command(self) -> list[str]:
        return [
            *transformers_cli(),
            "serve",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            self.device,
            *self.extra_args,
        ]
