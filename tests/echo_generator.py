"""`EchoGenerator`: the `Generator` contract on the real continuous-batching scheduler, with a
stand-in for the model, for the serving and chat tests."""

from __future__ import annotations

import time

import numpy as np

from persllm_jax.inference.kv_pages import PagePool
from persllm_jax.inference.scheduler import Scheduler


class CharTokenizer:
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


class EchoGenerator:
    """Follows the Generator contract on the real continuous-batching scheduler, with a stand-in
    for the model: one token per character, and the reply is "echo: <last message>", one
    character per model call (each call takes `delay_s`).

    A prompt containing FAIL makes every model call it is in raise; DIE makes the call end the
    worker; a conversation containing BADTEMPLATE makes `encode_chat` raise, as a chat template
    that rejects a conversation does. `batch_sizes`: the rows of each call; `drawn`: characters
    generated per prompt text.
    """

    def __init__(self, delay_s: float = 0.02, max_batch: int = 8, max_length: int = 64):
        self.delay_s = delay_s
        self.max_batch = max_batch
        self.max_length = max_length
        self.batch_sizes: list[int] = []
        self.drawn: dict[str, int] = {}
        self._prompts: dict[int, str] = {}
        self.scheduler = Scheduler(
            self._run_call,
            self._reset_seen,
            PagePool(max_batch * -(-max_length // 16) + 1, 16),
            slots=max_batch,
            max_length=self.max_length,
            eos_ids=frozenset({CharTokenizer.eos_token_id}),
            tokenizer=CharTokenizer(),
        )

    def encode_chat(self, messages):
        text = "\n".join(f"{m['role']}:{m['content']}" for m in messages)
        if "BADTEMPLATE" in text:
            raise RuntimeError("Conversation roles must alternate user/assistant")
        return [ord(c) for c in text + "\nassistant:"]

    def complete(self, prompts, params, on_text=None, cancelled=None):
        return self.scheduler.complete(prompts, params, on_text, cancelled)

    def _reset_seen(self, slot, prompt):
        self._prompts[slot] = "".join(map(chr, prompt))

    def _run_call(self, call, greedy_only, keep_logits):
        time.sleep(self.delay_s)
        rows = [i for i, slot in enumerate(call.slots) if slot < self.max_batch]
        self.batch_sizes.append(len(rows))
        tokens = np.zeros(len(call.slots), np.int32)
        for i in rows:
            text = self._prompts[int(call.slots[i])]
            if "FAIL" in text:
                raise RuntimeError("injected generation failure")
            if "DIE" in text:
                raise SystemExit("injected worker death")
            reply = "echo: " + text.rsplit("\n", 2)[-2].split(":", 1)[1]
            drawn = int(call.drawn[i])
            self.drawn[text] = drawn + 1
            tokens[i] = ord(reply[drawn]) if drawn < len(reply) else CharTokenizer.eos_token_id
        return tokens, None
