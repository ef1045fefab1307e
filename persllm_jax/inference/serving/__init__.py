"""`persllm serve`: an OpenAI-compatible chat server (`/v1/chat/completions`, plain and streamed,
`/v1/models`, `/health`) whose engine batches concurrent requests into one JAX worker."""

from persllm_jax.inference.serving.launch import ServerProcess, ServerThread, serve
from persllm_jax.inference.serving.protocol import RequestError, parse_request

__all__ = ["RequestError", "ServerProcess", "ServerThread", "parse_request", "serve"]
