"""Talking to OpenAI-compatible LLM endpoints: one endpoint config, a client with a resumable
on-disk answer cache and a retry policy, used both to annotate persona data and to judge answers;
and local servers on loopback (a free port, waiting until ready, stopping the process group)."""
