"""Where and how to reach one OpenAI-compatible chat endpoint: `EndpointConfig`.

The annotator of `persllm build-data` and the judge of `persllm eval` are both such endpoints; their config
sections extend this dataclass (changing defaults or adding fields), so these settings are spelled once.
`persllm_jax.llm.client.LLMClient.from_config` turns one into a client.
"""

from __future__ import annotations

import dataclasses
import os

# `api_key: env:NAME` reads the key from environment variable NAME, so a config file can say where
# a key is without holding it.
ENV_PREFIX = "env:"


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    base_url: str = "http://127.0.0.1:8000/v1"  # any OpenAI-compatible endpoint
    model: str = "gpt-4-turbo"
    # empty: OPENAI_API_KEY, else a placeholder for local servers; `env:NAME`: environment
    # variable NAME. Kept out of repr so that logging a config cannot leak it.
    api_key: str = dataclasses.field(default="", repr=False)
    concurrency: int = 8  # requests on the wire at once (the most, when adaptive)
    # lower the concurrency on timeouts, 429 and 503 and raise it back slowly (additive increase,
    # multiplicative decrease); false keeps exactly `concurrency` on the wire
    adaptive: bool = True
    max_retries: int = 6  # retries after the first attempt
    timeout_s: float = 120.0  # per attempt
    # the wait before a retry when the server sends no Retry-After: `retry.backoff_delay`
    backoff_s: float = 1.0
    backoff_cap_s: float = 60.0


def resolve_api_key(value: str) -> str | None:
    """The key an `api_key` setting stands for: `env:NAME` -> $NAME (an error naming NAME when it
    is unset), "" -> None (the client then uses OPENAI_API_KEY or a placeholder)."""
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX) :]
        if name not in os.environ:
            raise ValueError(f"api_key is {value!r} but the environment variable {name} is not set")
        return os.environ[name]
    return value or None
