"""Text generation with continuous batching over a paged KV cache: `Generator` and `generate()`.

`Generator` owns the model's compiled call (`paged_forward` plus the sampler), the KV page pool
and a `Scheduler` that decides what each call runs (see scheduler.py): `complete()` puts its
prompts through the scheduler and steps it until they are answered; the server steps the same
scheduler from its worker thread as requests arrive. Every sampling setting is per row, so one
call serves requests with different settings; a row's samples depend only on its own seed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.data.chat_templates import template_options
from persllm_jax.inference.kv_pages import PagePool
from persllm_jax.inference.paged_forward import (
    empty_pool,
    layer_kinds,
    paged_hidden_states,
    pool_bytes_per_token,
    ring_pages,
    unstack_layers,
    write_pages,
)
from persllm_jax.inference.sampling import GREEDY, SamplingParams, sample
from persllm_jax.inference.scheduler import (
    CallRows,
    Completion,
    Scheduler,
    batch_bucket,
    round_up_length,
)
from persllm_jax.io.pretrained import eos_token_ids, generation_config
from persllm_jax.model.decoder import CausalLM

__all__ = ["Completion", "Generator", "SamplingParams", "generate"]

log = logging.getLogger(__name__)

PAGE_SIZE = 16  # tokens per KV page: the prefix cache's unit too
# Without a memory budget, the cache holds 1024 tokens per slot (a persona prompt, its history
# and a reply; longer prompts borrow the pages shorter ones leave), and at least 4096 in all.
_DEFAULT_TOKENS_PER_SLOT = 1024
_DEFAULT_MIN_TOKENS = 4096


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
    """Generates from one model; keeps its compiled calls, its KV pages and its prefix cache
    across calls.

    `max_batch`: decode slots (rows decoding together); `kv_cache_gib`: the KV cache's memory
    budget, held by every device of the model's mesh (default: 1024 tokens per slot, at least
    4096 tokens);
    `prefix_cache`: reuse the keys and values of prompt prefixes seen before;
    `unroll_layers`: run the layers one after another over a per-layer copy of their weights
    instead of scanning the stacked ones: on CPU a single stream decodes about 1.3x as fast, at
    the cost of a second copy of the layers' weights and about three times the compile time per
    call shape; at 4 to 16 rows the scan was as fast or faster (see `unstack_layers`)"""

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        *,
        max_batch: int = 16,
        kv_cache_gib: float | None = None,
        prefix_cache: bool = True,
        prefill_chunk: int = 512,
        unroll_layers: bool = False,
    ):
        from flax import nnx

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._graphdef, self._state = nnx.split(model)
        self._unroll = unroll_layers
        self._mesh = _model_mesh(self._state)
        self._layer_states = self._unstacked_layers()
        self.eos_ids = self._end_of_turn_ids(tokenizer, eos_token_ids(generation_config(model)))
        per_token = pool_bytes_per_token(model.cfg)
        if kv_cache_gib is None or not per_token:  # (no global layers: the budget has nothing to size)
            tokens = max(max_batch * _DEFAULT_TOKENS_PER_SLOT, _DEFAULT_MIN_TOKENS)
        else:
            if kv_cache_gib <= 0:
                raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
            tokens = int(kv_cache_gib * 2**30) // per_token
        num_pages = max(tokens // PAGE_SIZE, 2) + 1  # and the scratch page
        # sliding-window layers: a fixed ring of pages per slot (and the scratch page)
        ring = ring_pages(model.cfg, PAGE_SIZE, prefill_chunk)
        self._rings = None
        if ring:
            self._rings = np.zeros((max_batch + 1, ring), np.int32)  # the spare slot: scratch
            self._rings[:max_batch] = 1 + np.arange(max_batch * ring, dtype=np.int32).reshape(max_batch, ring)
            if prefix_cache:
                log.info("no prefix cache: a sliding-window layer keeps only the window of a prompt")
            prefix_cache = False
        self._ring_total = max_batch * ring + 1 if ring else 0
        self.pages = PagePool(num_pages, PAGE_SIZE, prefix_cache=prefix_cache)
        self._new_cache()
        self.kv_cache_bytes = sum(int(a.nbytes) for a in self._pool)
        self.scheduler = Scheduler(
            self._run_call,
            self._reset_seen,
            self.pages,
            slots=max_batch,
            max_length=self.max_length,
            eos_ids=self.eos_ids,
            tokenizer=tokenizer,
            prefill_chunk=prefill_chunk,
        )
        self._call = jax.jit(self._call_fn, static_argnames=("greedy_only", "keep_logits"))
        self._commit = jax.jit(self._commit_fn, donate_argnums=(0, 1))
        self._reset = jax.jit(self._reset_fn, donate_argnums=(0,))

    def release_cache(self) -> None:
        """Give the KV pages' memory back while idle (the compiled calls stay); the next request
        makes a new cache, without cached prefixes."""
        if not self.scheduler.busy:
            self.pages.clear_prefixes()
            self._pool = self._seen = None

    def _new_cache(self) -> None:
        with self._mesh_context():
            self._pool = empty_pool(self.model.cfg, self.pages.num_pages, PAGE_SIZE, self._ring_total)
            # one row of seen-token flags per slot, and a spare one for filler rows
            self._seen = jnp.zeros((self.max_batch + 1, self.model.cfg.vocab_size), bool)

    def sync(self) -> None:
        """Pick up the model's current parameters (after training it in place); cached prefixes
        computed with the old ones are dropped."""
        from flax import nnx

        self._layer_states = None  # (the old copy goes before the new one is made)
        self._state = nnx.state(self.model)
        self._layer_states = self._unstacked_layers()
        if not self.scheduler.busy:
            self.pages.clear_prefixes()

    def _unstacked_layers(self):
        if not self._unroll:
            return None
        with self._mesh_context():
            return unstack_layers(self.model)

    def _mesh_context(self):
        return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

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

    # -- device side -----------------------------------------------------------------------------

    def _call_fn(
        self, state, layer_states, pool, seen, ids, positions, valid, pages, ring, last, slots, drawn, rows, *,
        greedy_only: bool, keep_logits: bool,
    ):  # fmt: skip
        """The model over one call's rows and the sampled next tokens; reads the cache only."""
        from flax import nnx

        model = nnx.merge(self._graphdef, state)
        hidden, new_kv = paged_hidden_states(model, ids, positions, valid, pool, pages, ring, layer_states)
        at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
        logits_BV = model.logits_from_hidden(at_last)[:, 0]
        token_B = sample(logits_BV, seen[slots], rows, drawn, greedy_only)
        return token_B, (logits_BV if keep_logits else None), new_kv

    def _commit_fn(self, pool, seen, new_kv, positions, valid, pages, ring, slots, token_B, emits):
        """Store a call's keys and values, and mark each emitted token as seen by its slot."""
        pool = write_pages(pool, new_kv, positions, valid, pages, ring, layer_kinds(self.model.cfg))
        return pool, seen.at[slots, token_B].max(emits)

    @staticmethod
    def _reset_fn(seen, slot, ids):
        return seen.at[slot].set(False).at[slot, ids].set(True)

    def _run_call(self, call: CallRows, greedy_only: bool, keep_logits: bool):
        p = call.params
        rows = {
            "temperature": np.array([x.temperature for x in p], np.float32),
            "top_k": np.array([x.top_k for x in p], np.int32),
            "top_p": np.array([x.top_p for x in p], np.float32),
            "penalty": np.array([x.repetition_penalty for x in p], np.float32),
            "seed": np.array([x.seed for x in p], np.uint32),
        }
        with self._mesh_context():
            try:
                ring = None if self._rings is None else self._rings[call.slots]
                token_B, logits, new_kv = self._call(
                    self._state, self._layer_states, self._pool, self._seen, call.ids, call.positions, call.valid, call.cached_pages,
                    ring, call.last, call.slots, call.drawn, rows,
                    greedy_only=greedy_only, keep_logits=keep_logits,
                )  # fmt: skip
                self._pool, self._seen = self._commit(
                    self._pool, self._seen, new_kv, call.positions, call.valid, call.pages, ring,
                    call.slots, token_B, call.emits,
                )  # fmt: skip
                return np.asarray(token_B), logits
            except BaseException:
                self._new_cache()  # the failed call may have consumed the donated cache
                raise

    def _reset_seen(self, slot: int, prompt: list[int]) -> None:
        ids = np.full((round_up_length(len(prompt)),), prompt[0], np.int32)  # padded with a repeat
        ids[: len(prompt)] = prompt
        if self._pool is None:  # released while idle
            self._new_cache()
        with self._mesh_context():
            self._seen = self._reset(self._seen, np.int32(slot), ids)

    # -- host side -------------------------------------------------------------------------------

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        keep_first_logits: bool = False,
    ) -> list[Completion]:
        """Continue each token-id prompt (see `Scheduler.complete`). Rows run `max_batch` at a
        time, each next one joining as soon as a slot frees; `keep_first_logits` returns the
        logits of each first token (`Completion.first_logits`)."""
        return self.scheduler.complete(prompts, params, on_text, cancelled, keep_first_logits)

    def chat(
        self,
        conversations: Sequence[Sequence[dict]],
        params: SamplingParams | Sequence[SamplingParams],
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Reply to each conversation (a list of {"role", "content"} messages)."""
        return self.complete([self.encode_chat(c) for c in conversations], params, on_text)


_GENERATORS: dict[tuple[int, int], Generator] = {}


def _generator_for(model: CausalLM, tokenizer, rows: int) -> Generator:
    """One Generator (and its compiled steps) per model and tokenizer, kept across calls, with
    slots (and KV memory) for `rows` conversations, up to 16."""
    key = (id(model), id(tokenizer))
    gen = _GENERATORS.get(key)
    slots = batch_bucket(min(rows, 16))
    if gen is None or gen.model is not model or gen.tokenizer is not tokenizer or gen.max_batch < slots:
        if len(_GENERATORS) >= 2:
            _GENERATORS.pop(next(iter(_GENERATORS)))
        _GENERATORS.pop(key, None)
        gen = _GENERATORS[key] = Generator(model, tokenizer, max_batch=slots)
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
    gen = _generator_for(model, tokenizer, len(conversations))
    try:
        return [c.text for c in gen.chat(conversations, params)]
    finally:
        gen.release_cache()  # a kept generator holds its compiled calls, not its cache
