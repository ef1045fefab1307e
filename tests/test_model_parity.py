"""Our decoder against transformers' PyTorch models, same weights (fp32, max abs diff <= 1e-4)."""

import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax import load_pretrained
from tests import hf_fixtures

TOLERANCE = 1e-4  # whole model in fp32


@pytest.mark.parametrize("variant", sorted(hf_fixtures.TINY_VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf_model = hf_fixtures.save_tiny(variant, tmp_path)
    model, _ = load_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(0, hf_fixtures.TINY_COMMON["vocab_size"], (2, 48))
    reference = hf_fixtures.torch_logits(hf_model, ids)
    ours = np.asarray(model(jnp.asarray(ids)))
    assert np.abs(reference).max() > 3.0, "weights too small for a meaningful comparison"
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


def test_padding_mask_matches_transformers(tmp_path):
    hf_model = hf_fixtures.save_tiny("llama_tied_gqa", tmp_path)
    model, _ = load_pretrained(tmp_path)
    ids = np.random.RandomState(1).randint(0, 320, (2, 20))
    mask = np.ones_like(ids)
    mask[1, 14:] = 0  # right padding: the real tokens must not see the padding
    reference = hf_fixtures.torch_logits(hf_model, ids, mask)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours[0], reference[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours[1, :14], reference[1, :14], atol=TOLERANCE, rtol=0)


def test_causality(tmp_path):
    """Logits at position t do not depend on tokens after t."""
    hf_fixtures.save_tiny("qwen2", tmp_path)
    model, _ = load_pretrained(tmp_path)
    rng = np.random.RandomState(2)
    ids = rng.randint(0, 320, (1, 32))
    changed = ids.copy()
    changed[0, 20:] = rng.randint(0, 320, 12)
    a, b = np.asarray(model(jnp.asarray(ids))), np.asarray(model(jnp.asarray(changed)))
    np.testing.assert_array_equal(a[0, :20], b[0, :20])
    assert np.abs(a[0, 20:] - b[0, 20:]).max() > 1e-2


def test_bf16_compute_close_to_fp32(tmp_path):
    hf_fixtures.save_tiny("llama_tied_gqa", tmp_path)
    fp32, _ = load_pretrained(tmp_path)
    bf16, _ = load_pretrained(tmp_path, compute_dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.float32  # parameters stay fp32
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 320, (2, 16)))
    a, b = np.asarray(fp32(ids)), np.asarray(bf16(ids))
    # bf16 has 8 mantissa bits: relative error ~1e-2 per op; compare at the scale of the logits.
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("variant", ["qwen3_tied_head_dim", "gemma3_sliding", "llama_tied_gqa"])
def test_packed_rows_equal_transformers_segment_by_segment(variant, tmp_path):
    """Three sequences packed into one row (positions restart, segment ids 1-3, padding after),
    longer than an attention block and than Gemma's window: each segment's logits equal
    transformers' on that sequence alone."""
    hf_model = hf_fixtures.save_tiny(variant, tmp_path)
    model, _ = load_pretrained(tmp_path)
    rng = np.random.RandomState(4)
    lengths = [70, 130, 60]
    row = np.zeros((1, 280), np.int32)
    segments, positions = np.zeros_like(row), np.zeros_like(row)
    start = 0
    for index, length in enumerate(lengths, start=1):
        row[0, start : start + length] = rng.randint(0, hf_fixtures.TINY_COMMON["vocab_size"], length)
        segments[0, start : start + length] = index
        positions[0, start : start + length] = np.arange(length)
        start += length
    hidden = model.hidden_states(
        jnp.asarray(row), positions_BT=jnp.asarray(positions), segment_ids_BT=jnp.asarray(segments)
    )
    packed = np.asarray(model.logits_from_hidden(hidden))
    start = 0
    for length in lengths:
        alone = hf_fixtures.torch_logits(hf_model, row[:, start : start + length])
        np.testing.assert_allclose(packed[:, start : start + length], alone, atol=TOLERANCE, rtol=0)
        start += length
