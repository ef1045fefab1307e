"""Sliding-window layers through the KV cache: greedy continuations past the window equal
transformers' (Gemma 3 with local and global layers, Mistral with a window on every layer), with
left-padded batch rows over the whole-length cache that probe scoring uses, and through the
serving engine, whose sliding layers keep a fixed ring of pages per slot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from persllm_jax import load_pretrained
from tests import hf_fixtures

PROMPT_LENGTHS = (9, 30)  # the longer prompt alone is past both windows at prefill
NEW_TOKENS = 40  # continuations past the windows (24 and 20)


def _greedy(model, prompts, new_tokens):
    """Greedy continuations through the cache: one left-padded prefill, then a token a step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, positions, key_valid, cache, slot):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.cached_hidden_states(ids, positions, key_valid, cache, slot)
        return model.logits_from_hidden(hidden[:, -1:])[:, 0].argmax(-1).astype(jnp.int32), cache

    b, total = len(prompts), max(map(len, prompts))
    pad = np.asarray([total - len(p) for p in prompts], np.int32)
    ids = np.zeros((b, total), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, pad[row] :] = prompt
    cache_len = total + new_tokens
    key_valid = jnp.asarray(np.arange(cache_len)[None, :] >= pad[:, None])
    positions = jnp.asarray(np.maximum(np.arange(total)[None, :] - pad[:, None], 0).astype(np.int32))
    token, cache = step(
        state,
        jnp.asarray(ids),
        positions,
        key_valid,
        model.init_cache(b, cache_len),
        jnp.int32(0),
    )
    out = [np.asarray(token)]
    for slot in range(total, total + new_tokens - 1):
        positions = jnp.asarray((slot - pad)[:, None])
        token, cache = step(state, token[:, None], positions, key_valid, cache, jnp.int32(slot))
        out.append(np.asarray(token))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("variant", ["gemma3_sliding", "mistral_sliding"])
def test_greedy_past_the_window_equals_transformers(variant, tmp_path):
    hf_model = hf_fixtures.save_tiny(variant, tmp_path)
    model, _ = load_pretrained(tmp_path)
    assert model.cfg.has_sliding_layers and model.cfg.sliding_window < min(PROMPT_LENGTHS) + NEW_TOKENS
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 320, n).tolist() for n in PROMPT_LENGTHS]
    ours = _greedy(model, prompts, NEW_TOKENS)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            reference = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )[0, len(prompt) :].numpy()
        assert ours[row].tolist() == reference.tolist(), f"row {row}"
    # the continuations differ from what full attention gives: the window took effect
    unwindowed = model.cfg.replace(layer_types=(), sliding_window=0)
    full, _ = load_pretrained(tmp_path, layer_types=(), sliding_window=0)
    assert full.cfg == unwindowed
    assert _greedy(full, prompts, NEW_TOKENS).tolist() != ours.tolist()


def test_splash_runs_a_gemma_model_as_xla_does(tmp_path):
    """The whole tiny Gemma 3 (local, global, local layers; window 24) on 160-token rows with the splash
    kernel (Pallas interpret mode here) gives XLA's block attention's logits (fp32, 1e-4)."""
    hf_fixtures.save_tiny("gemma3_sliding", tmp_path)
    xla, _ = load_pretrained(tmp_path)
    splash, _ = load_pretrained(tmp_path, attention_impl="splash")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 320, (2, 160)))
    np.testing.assert_allclose(np.asarray(splash(ids)), np.asarray(xla(ids)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["gemma3_sliding", "mistral_sliding"])
def test_the_generator_past_the_window_equals_transformers_in_a_fixed_ring(variant, tmp_path):
    """The serving engine (continuous batching over pages): two rows, one joining after the other
    has passed its window, decode greedily past the window as transformers does, with the layers
    scanned and unrolled; the sliding layers' pages are a ring per slot whose size is set by the
    window, not by the reply length or the cache's budget."""
    from persllm_jax.inference.generation import Generator, SamplingParams
    from persllm_jax.inference.scheduler import Request

    hf_model = hf_fixtures.save_tiny(variant, tmp_path)
    model, _ = load_pretrained(tmp_path)

    class Tok:
        pad_token_id, eos_token_id = 0, None

        def get_vocab(self):
            return {}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, 320, n).tolist() for n in PROMPT_LENGTHS]
    rings = []
    for budget, unroll in ((None, False), (0.01, False), (None, True)):
        gen = Generator(
            model, Tok(), max_batch=2, kv_cache_gib=budget, prefill_chunk=16, unroll_layers=unroll
        )
        rings.append(gen._pool[2].shape)  # the sliding layers' keys
        assert (gen._layer_states is not None) == unroll
        done = {}
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        gen.scheduler.add(Request(prompts[0], params, on_done=functools.partial(done.__setitem__, 0)))
        for _ in range(30):  # the first row runs past its window before the second joins
            gen.scheduler.step()
        gen.scheduler.add(Request(prompts[1], params, on_done=functools.partial(done.__setitem__, 1)))
        while len(done) < 2:
            gen.scheduler.step()
        for row, prompt in enumerate(prompts):
            with torch.no_grad():
                reference = hf_model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )[0, len(prompt) :].tolist()
            assert done[row].token_ids == reference, (variant, budget, unroll, row)
    # after training in place, sync() gives the unrolled layers the model's new weights
    nnx.update(model.layers, jax.tree.map(lambda a: a * 2, nnx.state(model.layers)))
    gen.sync()
    stacked = jax.tree.leaves(nnx.state(model.layers))
    for i, layer in enumerate(gen._layer_states):
        for got, want in zip(jax.tree.leaves(layer), stacked, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want[i]))
    window_pages = -(-model.cfg.sliding_window // 16)
    local = sum(model.cfg.sliding_layers)
    # [sliding layers, 2 slots x (window + 1) pages + scratch, K, 16, H] (the window is longer than
    # a 16-token prefill chunk), under either budget
    ring = (local, 2 * (window_pages + 1) + 1, model.cfg.num_kv_heads, 16, model.cfg.head_dim)
    assert rings[0] == rings[1] == rings[2] == ring
