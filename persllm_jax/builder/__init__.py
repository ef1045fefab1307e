"""`persllm build-data`: persona materials -> retrieval of related passages -> chain-of-thought
annotation by an LLM -> cleaned persona dialogues, general chats mixed in, and automatically mined
preference pairs, written as JSONL, `datasets` and TFDS. Uses personas, llm and data; the
top-level `data_builder` package is its public face."""
