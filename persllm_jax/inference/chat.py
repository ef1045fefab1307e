"""`persllm chat`: talk to a model in the terminal, optionally as a persona at one stage of life.

The system message is the one the training dialogues carry (`persllm_jax.personas.prompts`): the
stage token, then "You are <name>. <description>". Lines come from stdin (a terminal or a pipe); each
reply is streamed to stdout as it is generated.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import TextIO

from persllm_jax.inference.sampling import PERSONA_SAMPLING, SamplingParams
from persllm_jax.personas.prompts import persona_system_message

log = logging.getLogger(__name__)

COMMANDS = "/reset clears the conversation, /exit (or end of input) quits"


class ChatSession:
    """A conversation with history over a `Generator`; `reply()` streams through `on_text`."""

    def __init__(self, generator, params, system: str | None = None):
        self.generator = generator
        self.params = params
        self.system = system
        self.history: list[dict] = []
        self.turns = 0

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _fit(self, history: list[dict]) -> tuple[list[int], list[dict]]:
        """Prompt ids and the history they hold: the oldest exchanges go until prompt and reply fit."""
        budget = self.generator.max_length - self.params.max_new_tokens
        head = [{"role": "system", "content": self.system}] if self.system else []
        ids = self.generator.encode_chat(head + history)
        while len(ids) > budget and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]
            ids = self.generator.encode_chat(head + history)
            if len(ids) <= budget:
                log.warning(
                    "the conversation outgrew the model's %d positions: dropped its oldest turns",
                    self.generator.max_length,
                )
        if len(ids) > budget:
            raise ValueError(
                f"the message needs {len(ids)} prompt tokens, and with --max-new-tokens "
                f"{self.params.max_new_tokens} that exceeds the model's {self.generator.max_length} positions"
            )
        return ids, history

    def reply(self, text: str, on_text=None) -> str:
        """The model's reply to `text`; history changes only once the reply is complete."""
        ids, history = self._fit([*self.history, {"role": "user", "content": text}])
        # A new seed each turn, so that sampled replies do not repeat the same random draws.
        params = dataclasses.replace(self.params, seed=self.params.seed + self.turns)
        callback = None if on_text is None else (lambda _row, delta: on_text(delta))
        (completion,) = self.generator.complete([ids], [params], callback)
        self.turns += 1
        self.history = [*history, {"role": "assistant", "content": completion.text}]
        return completion.text


def repl(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read a line, stream the reply, repeat. Prompts are shown only on a terminal, so piped output is replies only."""
    interactive = stdin.isatty()
    if interactive:
        print(f"({COMMANDS})", file=sys.stderr)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            return
        if not line:
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {COMMANDS}", file=sys.stderr)
            continue

        def write(delta: str) -> None:
            stdout.write(delta)
            stdout.flush()

        try:
            session.reply(text, on_text=write)
        except KeyboardInterrupt:
            stdout.write("\n")
            print("(interrupted; that message was not kept)", file=sys.stderr)
            continue
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        stdout.write("\n\n" if interactive else "\n")
        stdout.flush()


def run_chat(
    model_path: str,
    *,
    persona: str | None = None,
    stage: str | None = None,
    personas_dir: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = PERSONA_SAMPLING.temperature,
    top_p: float = PERSONA_SAMPLING.top_p,
    top_k: int = PERSONA_SAMPLING.top_k,
    repetition_penalty: float = PERSONA_SAMPLING.repetition_penalty,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    # Everything that can be wrong with the arguments fails before the model loads.
    system = None
    if persona is not None:
        system, persona_obj, stage_obj = persona_system_message(personas_dir, persona, stage)
    elif stage is not None:
        raise ValueError("--stage needs --persona")
    if not 0 <= seed < 2**31:
        raise ValueError(f"--seed must be in [0, 2**31), got {seed}")  # PRNG seeds are 32-bit
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    if not Path(model_path).exists():
        raise FileNotFoundError(f"model path does not exist: {model_path}")

    import jax.numpy as jnp

    from persllm_jax.inference.generation import Generator
    from persllm_jax.io.pretrained import load_pretrained

    model, tokenizer = load_pretrained(model_path, dtype=jnp.dtype(dtype))
    if tokenizer is None:
        raise ValueError(f"{model_path} has no tokenizer; chat needs one and its chat template")
    if system is not None:
        pieces = tokenizer.encode(stage_obj.token, add_special_tokens=False)
        if len(pieces) != 1:
            log.warning(
                "stage token %s is %d tokens for this tokenizer: this model was not trained with stage tokens",
                stage_obj.token,
                len(pieces),
            )
        print(f"(chatting with {persona_obj.name}, stage {stage_obj.id}: {stage_obj.when})", file=sys.stderr)
    session = ChatSession(Generator(model, tokenizer, max_batch=1), params, system)
    repl(session)
