"""Batched text generation with a KV cache.

Prompts are left-padded into a batch whose size and length are rounded up to a few buckets, so
the prefill and the one-token decode step compile once per bucket and are reused. Decoding runs
one jitted step per token from the host, which lets the caller stream text, stop rows on stop
strings and drop finished rows without recompiling. Every sampling setting is per row, so one
batch can serve requests with different settings (the server relies on this).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.data.chat_templates import template_options
from persllm_jax.inference.sampling import GREEDY, SamplingParams, sample
from persllm_jax.inference.text_stream import TextStream
from persllm_jax.io.pretrained import eos_token_ids, generation_config
from persllm_jax.model.decoder import CausalLM

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Lengths round up to 128 * (1, 1.5, 2, 3, 4, 6, ...): at most half the prefill is padding,
# and a server sees a handful of compiled shapes instead of one per distinct prompt length.
_LENGTH_UNIT = 128


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _length_bucket(n: int) -> int:
    size = _LENGTH_UNIT
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def _batch_bucket(n: int) -> int:
    return next((b for b in _BATCH_BUCKETS if b >= n), _round_up(n, _BATCH_BUCKETS[-1]))


def _mark_seen(seen_BV, ids_BT, valid_BT):
    rows = jnp.arange(ids_BT.shape[0])[:, None]
    return seen_BV.at[rows, ids_BT].max(valid_BT)


def _model_mesh(state):
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


# End-of-turn tokens of ChatML, Llama-3, GPT-2-style and Llama-2 templates: only for models that
# come without a generation config.
_COMMON_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")


class Generator:
    """Generates from one model; keeps its compiled prefill and decode steps across calls."""

    def __init__(self, model: CausalLM, tokenizer, *, max_batch: int = 16):
        from flax import nnx

        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._graphdef, self._state = nnx.split(model)
        self._mesh = _model_mesh(self._state)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = self._end_of_turn_ids(tokenizer, eos_token_ids(generation_config(model)))
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len", "greedy_only"))
        self._decode = jax.jit(self._decode_fn, static_argnames=("greedy_only",), donate_argnums=(2, 3))

    def sync(self) -> None:
        """Pick up the model's current parameters (after training it in place)."""
        from flax import nnx

        self._state = nnx.state(self.model)

    @staticmethod
    def _end_of_turn_ids(tokenizer, configured: list[int]) -> frozenset[int]:
        """The model's generation config's eos ids and the tokenizer's eos. A model without a
        generation config (a GGUF file) falls back to the end-of-turn tokens of common chat
        templates found in its vocabulary."""
        ids = {tokenizer.eos_token_id, *configured}
        if not configured:
            vocab = tokenizer.get_vocab()
            ids.update(vocab[t] for t in _COMMON_END_OF_TURN if t in vocab)
        return frozenset(i for i in ids if i is not None)

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_position_embeddings

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, **template_options(self.tokenizer)
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    # -- jitted pieces ---------------------------------------------------------------------------

    def _prefill_fn(self, state, ids_BT, pad_B, rows, *, cache_len: int, greedy_only: bool):
        from flax import nnx

        model = nnx.merge(self._graphdef, state)
        b, t = ids_BT.shape
        slots_S = jnp.arange(cache_len, dtype=jnp.int32)
        key_valid_BS = slots_S[None, :] >= pad_B[:, None]
        positions_BT = jnp.maximum(jnp.arange(t, dtype=jnp.int32)[None, :] - pad_B[:, None], 0)
        cache = model.init_cache(b, cache_len, windowed=True)  # sliding-window layers keep a ring
        hidden, cache = model.cached_hidden_states(ids_BT, positions_BT, key_valid_BS, cache, 0)
        logits_BV = model.logits_from_hidden(hidden[:, -1:])[:, 0]
        seen = _mark_seen(jnp.zeros(logits_BV.shape, bool), ids_BT, key_valid_BS[:, :t])
        token_B = sample(logits_BV, seen, rows, 0, greedy_only)
        return token_B, cache, _mark_seen(seen, token_B[:, None], jnp.ones((b, 1), bool))

    def _decode_fn(self, state, token_B, cache, seen, pad_B, write_index, step, rows, *, greedy_only: bool):
        from flax import nnx

        model = nnx.merge(self._graphdef, state)
        cache_len = cache[0].shape[2]
        key_valid_BS = jnp.arange(cache_len, dtype=jnp.int32)[None, :] >= pad_B[:, None]
        positions_B1 = (write_index - pad_B)[:, None]
        hidden, cache = model.cached_hidden_states(
            token_B[:, None], positions_B1, key_valid_BS, cache, write_index
        )
        logits_BV = model.logits_from_hidden(hidden)[:, 0]
        next_B = sample(logits_BV, seen, rows, step, greedy_only)
        return next_B, cache, _mark_seen(seen, next_B[:, None], jnp.ones((token_B.shape[0], 1), bool))

    # -- host loop -------------------------------------------------------------------------------

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Completion]:
        """Continue each token-id prompt. `on_text(row, delta)` receives text as it becomes final;
        a row for which `cancelled(row)` turns true stops at the next step (finish "cancelled"),
        and the batch stops once every row has."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) >= self.max_length:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens; the model allows {self.max_length} "
                    "positions in all, prompt and completion together"
                )
        results: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = slice(start, start + self.max_batch)

            def shifted(row, delta, start=start):
                on_text(start + row, delta)

            def shifted_cancelled(row, start=start):
                return cancelled(start + row)

            results += self._complete_batch(
                list(prompts[chunk]),
                list(params[chunk]),
                shifted if on_text else None,
                shifted_cancelled if cancelled else None,
            )
        return results

    def _complete_batch(self, prompts, params, on_text, cancelled=None) -> list[Completion]:
        n = len(prompts)
        batch = _batch_bucket(n)
        prompt_len = _length_bucket(max(len(p) for p in prompts))
        budgets = [min(p.max_new_tokens, self.max_length - len(ids)) for p, ids in zip(params, prompts)]
        cache_len = prompt_len + _length_bucket(max(budgets))

        ids = np.full((batch, prompt_len), self.pad_id, np.int32)
        pad = np.full((batch,), prompt_len, np.int32)  # filler rows: all padding
        for row, prompt in enumerate(prompts):
            ids[row, prompt_len - len(prompt) :] = prompt
            pad[row] = prompt_len - len(prompt)
        pad[n:] = prompt_len - 1  # filler rows attend to one pad token, never to nothing
        filler = SamplingParams()
        rows_params = params + [filler] * (batch - n)
        rows = {
            "temperature": np.array([p.temperature for p in rows_params], np.float32),
            "top_k": np.array([p.top_k for p in rows_params], np.int32),
            "top_p": np.array([p.top_p for p in rows_params], np.float32),
            "penalty": np.array([p.repetition_penalty for p in rows_params], np.float32),
            "seed": np.array([p.seed for p in rows_params], np.uint32),
        }
        greedy_only = all(p.temperature == 0 for p in params)

        streams = [TextStream(self.tokenizer, p.stop) for p in params]
        finish: list[str | None] = [None] * n
        with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
            token_B, cache, seen = self._prefill(
                self._state, ids, pad, rows, cache_len=cache_len, greedy_only=greedy_only
            )
            for step in range(max(budgets)):
                tokens = np.asarray(token_B)
                for row in range(n):
                    if finish[row] is not None:
                        continue
                    stream = streams[row]
                    if cancelled is not None and cancelled(row):
                        finish[row] = "cancelled"
                        continue
                    if int(tokens[row]) in self.eos_ids:
                        finish[row] = "stop"
                    else:
                        stream.add(int(tokens[row]))
                        if stream.stopped:
                            finish[row] = "stop"
                        elif len(stream.ids) >= budgets[row]:
                            finish[row] = "length"
                    if on_text is not None:
                        delta = stream.delta(final=finish[row] is not None)
                        if delta:
                            on_text(row, delta)
                if all(f is not None for f in finish):
                    break
                token_B, cache, seen = self._decode(
                    self._state,
                    token_B,
                    cache,
                    seen,
                    pad,
                    np.int32(prompt_len + step),
                    np.int32(step + 1),
                    rows,
                    greedy_only=greedy_only,
                )
        return [Completion(s.text, s.ids, f or "length", len(p)) for s, f, p in zip(streams, finish, prompts)]

    def chat(
        self,
        conversations: Sequence[Sequence[dict]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Reply to each conversation (a list of {"role", "content"} messages)."""
        return self.complete([self.encode_chat(c) for c in conversations], params, on_text)


_GENERATORS: dict[tuple[int, int], Generator] = {}


def _generator_for(model: CausalLM, tokenizer) -> Generator:
    """One Generator (and its compiled steps) per model and tokenizer, kept across calls."""
    key = (id(model), id(tokenizer))
    gen = _GENERATORS.get(key)
    if gen is None or gen.model is not model or gen.tokenizer is not tokenizer:
        if len(_GENERATORS) >= 2:
            _GENERATORS.pop(next(iter(_GENERATORS)))
        gen = _GENERATORS[key] = Generator(model, tokenizer)
    else:
        gen.sync()  # the model may have been trained since the last call
    return gen


def generate(
    model: CausalLM,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    max_new_tokens: int = GREEDY.max_new_tokens,
    temperature: float = GREEDY.temperature,
    top_p: float = GREEDY.top_p,
    top_k: int = GREEDY.top_k,
    repetition_penalty: float = GREEDY.repetition_penalty,
    seed: int = GREEDY.seed,
    stop: Sequence[str] | None = None,
) -> list[str]:
    """Reply to each conversation; row i samples with seed `seed + i`. Greedy when temperature is 0."""
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed + i,
            stop=tuple(stop or ()),
        )
        for i in range(len(conversations))
    ]
    return [c.text for c in _generator_for(model, tokenizer).chat(conversations, params)]
