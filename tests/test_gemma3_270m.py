"""A real Gemma 3 offline: Gemma-3-270M from its GGUF package (18 layers, 5 local to each global one,
a 512-token window), dequantized by transformers' own GGUF loader; our import of it, its logits and
our greedy generation against transformers on the same weights."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from persllm_jax import load_pretrained
from persllm_jax.inference.generation import Generator
from persllm_jax.inference.sampling import SamplingParams
from persllm_jax.io import offline_models
from persllm_jax.model.config import FULL, SLIDING
from tests import hf_fixtures

PROMPTS = [
    "The capital of France is",
    "Charles Darwin sailed on the Beagle because",
    "Elementary, my dear Watson. The footprints in the garden",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gemma_hf(tmp_path_factory):
    """transformers' model from the GGUF, saved as an HF directory (the reference weights), and its
    tokenizer."""
    gguf = offline_models.gemma3_270m_gguf(tmp_path_factory.mktemp("gemma_gguf"))
    out = hf_fixtures.gguf_to_hf_dir(gguf, tmp_path_factory.mktemp("gemma_hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    yield out, model, transformers.AutoTokenizer.from_pretrained(out)
    for folder in (gguf.parent, out):  # 1.3 GB: not kept to the end of the session
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_import_reads_the_real_config(gemma_hf):
    out, hf_model, _ = gemma_hf
    ours, _ = load_pretrained(out)
    cfg = ours.cfg
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.head_dim) == ("gemma3", 18, 640, 256)
    assert cfg.layer_types == tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18))
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar) == (512, 256)
    assert (cfg.rope_theta, cfg.local_rope_theta) == (1_000_000.0, 10_000.0)
    assert abs(cfg.num_params - sum(p.numel() for p in hf_model.parameters())) == 0


@pytest.mark.slow
def test_logits_and_greedy_generation_equal_transformers(gemma_hf):
    out, hf_model, tokenizer = gemma_hf
    ours, our_tokenizer = load_pretrained(out)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert [our_tokenizer(p)["input_ids"] for p in PROMPTS] == prompts

    ids = np.asarray([prompts[0]])
    reference = hf_fixtures.torch_logits(hf_model, ids)
    # fp32 over 18 layers of a real model: logits reach tens, so 1e-3 absolute is ~1e-5 relative
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), reference, atol=1e-3, rtol=0)

    completions = Generator(ours, our_tokenizer).complete(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = expected[0, len(prompt) :].tolist()
        assert len(expected) == NEW_TOKENS  # no end of text within 32 tokens of these prompts
        assert list(completion.token_ids) == expected, tokenizer.decode(prompt)
