"""Generation with the KV cache: parity with transformers' greedy `generate`, the cache against a
full forward pass, sampling filters against independent references, stop strings and streaming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from persllm_jax import generate, load_pretrained
from persllm_jax.inference.generation import Generator
from persllm_jax.inference.sampling import TOP_CANDIDATES, SamplingParams, draw, filter_top_k_top_p, penalize
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.decoder import init_model
from persllm_jax.model.sharding import make_mesh
from tests import hf_fixtures

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "<TIME-I> You are Sherlock Holmes, the consulting detective."},
        {"role": "user", "content": "Mr Holmes, how did you know that I had been in Afghanistan?"},
    ],
    [
        {"role": "user", "content": "Name a famous naturalist."},
        {"role": "assistant", "content": "Charles Darwin."},
        {"role": "user", "content": "What did he study on the Galapagos islands?"},
    ],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_greedy(smollm2_hf_dir, smollm2_tokenizer):
    """transformers' greedy continuation of each conversation, one prompt at a time (no padding)."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    out = []
    for conv in CONVERSATIONS:
        enc = smollm2_tokenizer.apply_chat_template(
            conv, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            ids = hf_model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append(ids[0, enc["input_ids"].shape[1] :].tolist())
    return out


def _strip_eos(ids, eos_ids):
    return ids[: ids.index(next(i for i in ids if i in eos_ids))] if any(i in eos_ids for i in ids) else ids


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)], ids=["single_device", "mesh_2x2x2"])
def test_greedy_matches_transformers(smollm2_hf_dir, hf_greedy, mesh_shape):
    """Left-padded batch of 3 prompts, fp32: token for token what transformers generates."""
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    model, tokenizer = load_pretrained(smollm2_hf_dir, dtype=jnp.float32, mesh=mesh)
    # 4 slots: every device holds the KV cache, and the mesh's eight fake ones share this host
    gen = Generator(model, tokenizer, max_batch=4)
    completions = gen.chat(CONVERSATIONS, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert len({c.prompt_tokens for c in completions}) == 3  # really padded to different lengths
    for completion, reference in zip(completions, hf_greedy):
        assert completion.token_ids == _strip_eos(reference, gen.eos_ids)
    texts = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=NEW_TOKENS)
    assert texts == [c.text for c in completions]
    assert "Paris" in texts[0]


def _tiny_model(seed=0):
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    return init_model(cfg, seed)


def test_cached_decode_equals_full_forward():
    """Prefill + one-token steps through the cache give the logits of one pass over the whole
    (left-padded) sequence; atol 1e-5 covers fp32 summation order."""
    model = _tiny_model()
    rng = np.random.default_rng(0)
    lengths = [5, 9, 7]
    total, new = 12, 6
    pad = np.array([total - n for n in lengths], np.int32)
    ids = rng.integers(1, 64, size=(3, total + new)).astype(np.int32)
    valid = np.arange(total + new)[None, :] >= pad[:, None]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(positions)))

    cache = model.init_cache(3, 32)
    key_valid = np.arange(32)[None, :] >= pad[:, None]
    hidden, cache = model.cached_hidden_states(
        jnp.asarray(ids[:, :total]), jnp.asarray(positions[:, :total]), jnp.asarray(key_valid), cache, 0
    )
    stepped = [np.asarray(model.logits_from_hidden(hidden))]
    for t in range(total, total + new):
        hidden, cache = model.cached_hidden_states(
            jnp.asarray(ids[:, t : t + 1]),
            jnp.asarray(positions[:, t : t + 1]),
            jnp.asarray(key_valid),
            cache,
            t,
        )
        stepped.append(np.asarray(model.logits_from_hidden(hidden)))
    stepped = np.concatenate(stepped, axis=1)
    np.testing.assert_allclose(stepped[valid], full[valid], atol=1e-5, rtol=0)


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 50)).astype(np.float32) * 3
    seen_ids = [[1, 4, 4, 30], [0, 49]]
    seen = np.zeros((2, 50), bool)
    for row, ids in enumerate(seen_ids):
        seen[row, ids] = True
    ours = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(seen), jnp.asarray([1.3, 1.3])))
    processor = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    for row, ids in enumerate(seen_ids):
        ref = processor(torch.tensor([ids]), torch.tensor(logits[row : row + 1])).numpy()[0]
        np.testing.assert_allclose(ours[row], ref, rtol=1e-6)


def _reference_filter(row, k, p):
    """Plain-numpy top-k then top-p (keep the most likely tokens until their mass reaches p)."""
    order = np.argsort(-row, kind="stable")
    keep = np.zeros(row.shape, bool)
    k = k or row.size
    kept = order[:k]
    probs = np.exp(row[kept] - row[kept].max())
    probs /= probs.sum()
    mass = 0.0
    for token, prob in zip(kept, probs):
        keep[token] = True
        mass += prob
        if mass >= p:
            break
    return keep


# candidates=3: k above the candidates and top-p mass beyond them take the bisection path
@pytest.mark.parametrize("candidates", [TOP_CANDIDATES, 3])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (8, 0.9), (1, 0.5)])
def test_top_k_top_p_filter_matches_reference(top_k, top_p, candidates):
    rng = np.random.default_rng(top_k + int(top_p * 10))
    logits = rng.normal(size=(4, 40)).astype(np.float32) * 2
    out = np.asarray(
        filter_top_k_top_p(
            jnp.asarray(logits), jnp.full((4,), top_k), jnp.full((4,), top_p, jnp.float32), candidates
        )
    )
    for row in range(4):
        np.testing.assert_array_equal(np.isfinite(out[row]), _reference_filter(logits[row], top_k, top_p))
        np.testing.assert_array_equal(out[row][np.isfinite(out[row])], logits[row][np.isfinite(out[row])])


def test_draw_follows_the_softmax_and_never_picks_a_masked_token():
    """200k draws over 700 tokens (three chunks, the last partial; every 7th masked) against the
    softmax by a chi-square statistic: for a correct sampler it is about its degrees of freedom
    (sd sqrt(2 dof)); six sd above is a wrong distribution, not chance. A row with one token left
    always draws it, wherever it lies in its chunk."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=700).astype(np.float32) * 2
    logits[::7] = -np.inf
    n = 200_000
    draws = jax.jit(jax.vmap(draw, in_axes=(0, None)))
    tokens = np.asarray(draws(jax.random.split(jax.random.key(1), n), jnp.asarray(logits)))
    counts = np.bincount(tokens, minlength=700)
    assert counts[::7].sum() == 0
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    live = probs > 0
    chi2 = ((counts[live] - n * probs[live]) ** 2 / (n * probs[live])).sum()
    dof = live.sum() - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)
    for only in (0, 255, 256, 699):
        one = np.full(700, -np.inf, np.float32)
        one[only] = 0.0
        assert set(np.asarray(draws(jax.random.split(jax.random.key(2), 64), jnp.asarray(one)))) == {only}


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir):
    model, tokenizer = load_pretrained(smollm2_hf_dir)
    return Generator(model, tokenizer)


@pytest.mark.slow
def test_sampling_is_seeded_and_mixes_settings_per_row(smollm2):
    conv = [CONVERSATIONS[1]]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    greedy = SamplingParams(max_new_tokens=12)
    first = smollm2.chat(conv * 3, [sampled, greedy, SamplingParams(**{**sampled.__dict__, "seed": 8})])
    again = smollm2.chat(conv, [sampled])
    assert first[0].token_ids == again[0].token_ids  # same seed, same tokens, whatever the batch
    assert first[0].token_ids != first[2].token_ids  # another seed, another sample
    assert first[1].token_ids == smollm2.chat(conv, greedy)[0].token_ids
    top1 = smollm2.chat(conv, SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3))
    assert top1[0].token_ids == first[1].token_ids  # top-k 1 leaves only the greedy token


@pytest.mark.slow
def test_stop_strings_and_streaming(smollm2):
    conv = [CONVERSATIONS[0]]
    full = smollm2.chat(conv, SamplingParams(max_new_tokens=16))[0]
    assert full.text.startswith("The capital of France is")
    pieces = []
    stopped = smollm2.chat(
        conv, SamplingParams(max_new_tokens=16, stop=("France",)), on_text=lambda row, d: pieces.append(d)
    )[0]
    assert stopped.text == "The capital of " and stopped.finish_reason == "stop"
    assert "".join(pieces) == stopped.text
    pieces = []
    streamed = smollm2.chat(conv, SamplingParams(max_new_tokens=16), on_text=lambda row, d: pieces.append(d))
    assert "".join(pieces) == streamed[0].text == full.text and len(pieces) > 3
    short = smollm2.chat(conv, SamplingParams(max_new_tokens=3))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_too_long_prompt_is_refused():
    model = _tiny_model()

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def get_vocab(self):
            return {}

    gen = Generator(model, Tok())
    with pytest.raises(ValueError, match="prompt 1 has 256 tokens; the model allows 256"):
        gen.complete([[2, 3], [2] * 256], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_tiny_generation_respects_budget_near_the_context_end():
    """A prompt close to max_position_embeddings gets only the positions that remain."""
    model = _tiny_model()

    class Tok:
        pad_token_id, eos_token_id = 0, 63

        def get_vocab(self):
            return {}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    gen = Generator(model, Tok())
    out = gen.complete([[5] * 250, [7, 8]], SamplingParams(max_new_tokens=20))
    assert len(out[0].token_ids) <= 6 and out[0].finish_reason in ("length", "stop")
    assert 1 <= len(out[1].token_ids) <= 20 and all(0 <= t < 64 for t in out[1].token_ids)


def test_greedy_stops_on_the_generation_configs_eos_and_export_keeps_it(tmp_path, smollm2_tokenizer):
    """An eos id named only by the model's generation_config.json (as Llama-3.1 names
    `<|eom_id|>`) ends a greedy reply, and export writes that config back."""
    import json

    from persllm_jax.io.pretrained import save_pretrained

    src = tmp_path / "src"
    hf_fixtures.save_tiny("llama_tied_gqa", src, vocab_size=len(smollm2_tokenizer))
    smollm2_tokenizer.save_pretrained(src)
    (src / "generation_config.json").unlink(missing_ok=True)
    prompt = [[1, 2, 3, 4, 5]]
    free = Generator(*load_pretrained(src)).complete(prompt, SamplingParams(max_new_tokens=6))[0]
    assert len(free.token_ids) == 6 and free.finish_reason == "length"
    stop_id = free.token_ids[2]
    assert stop_id not in free.token_ids[:2]
    assert stop_id not in Generator(*load_pretrained(src)).eos_ids, "not an end-of-turn id without the config"

    eos = [smollm2_tokenizer.eos_token_id, stop_id]
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 1}))
    model, tokenizer = load_pretrained(src)
    stopped = Generator(model, tokenizer).complete(prompt, SamplingParams(max_new_tokens=6))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids[:2] == free.token_ids[:2] and len(stopped.token_ids) <= 3

    save_pretrained(model, tokenizer, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == eos


def test_cudnn_attention_refuses_left_padding():
    """cuDNN's kernel takes row lengths; a left-padded mask would silently attend to padding."""
    model = init_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                   num_heads=2, num_kv_heads=1, head_dim=16, attention_impl="cudnn"))  # fmt: skip
    ids = jnp.ones((2, 6), jnp.int32)
    left = jnp.asarray([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
    with pytest.raises(ValueError, match=r"needs right padding .* rows \[1\]"):
        model(ids, left)
