"""The real SmolLM2-135M-Instruct (offline GGUF, dequantized to fp32) against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from persllm_jax import load_pretrained
from tests import hf_fixtures

# 30 layers and logits up to ~40: fp32 rounding order alone gives a few 1e-4.
TOLERANCE = 1e-3

CHAT = [
    {"role": "system", "content": "You are Sherlock Holmes, the consulting detective of Baker Street."},
    {"role": "user", "content": "Mr Holmes, how did you know that I had been in Afghanistan?"},
    {"role": "assistant", "content": "You have a tanned face, yet your wrists are fair: the tropics, then."},
    {"role": "user", "content": "Remarkable! And what else can you tell about me?"},
]


def _chat_ids(tokenizer):
    return np.asarray([tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)])


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_hf_dir, smollm2_tokenizer):
    import torch

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    ids = _chat_ids(smollm2_tokenizer)
    assert ids.shape[1] > 60
    reference = hf_fixtures.torch_logits(hf_model, ids)
    model, tokenizer = load_pretrained(smollm2_hf_dir)
    assert model.cfg.num_layers == 30 and model.cfg.tie_word_embeddings
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(reference).max() > 20
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_load_gguf_directly(smollm2_gguf, smollm2_hf_dir, smollm2_tokenizer):
    """A .gguf path loads through transformers' dequantizer into the same weights."""
    from_gguf, tokenizer = load_pretrained(smollm2_gguf)
    from_dir, _ = load_pretrained(smollm2_hf_dir)
    np.testing.assert_array_equal(np.asarray(from_gguf.embed[...]), np.asarray(from_dir.embed[...]))
    np.testing.assert_array_equal(
        np.asarray(from_gguf.layers.mlp.down_proj.kernel[...]),
        np.asarray(from_dir.layers.mlp.down_proj.kernel[...]),
    )
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == smollm2_tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )
