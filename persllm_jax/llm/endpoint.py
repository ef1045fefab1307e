"""Where and how to reach one OpenAI-compatible chat endpoint: `EndpointConfig`.

The annotator of `persllm build-data` and the judge of `persllm eval` are both such endpoints; their config
sections extend this dataclass (changing defaults or adding fields), so these settings are spelled once.
`persllm_jax.llm.client.LLMClient.from_config` turns one into a client.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    base_url: str = "http://127.0.0.1:8000/v1"  # any OpenAI-compatible endpoint
    model: str = "gpt-4-turbo"
    # empty: OPENAI_API_KEY, else a placeholder for local servers. Kept out of repr so that logging
    # a config cannot leak it.
    api_key: str = dataclasses.field(default="", repr=False)
    concurrency: int = 8  # requests on the wire at once
    max_retries: int = 6  # retries after the first attempt
    timeout_s: float = 120.0  # per attempt
