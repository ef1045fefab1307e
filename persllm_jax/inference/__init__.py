"""Using a trained model: batched generation with a KV cache and per-row sampling, the text
stream that stops on stop strings, an interactive persona chat, two personas talking to each
other, and `serving/`, an OpenAI-compatible HTTP server. Uses model, io and personas."""
