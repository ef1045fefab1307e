"""Block-wise XLA attention against dense attention over a mask built here in numpy: outputs and
gradients for packed segments, right padding, MHA / GQA / MQA, lengths that are not a whole number of
blocks, bf16 inputs, a device mesh and sliding windows (traced, as the layer scan gives them); which
key blocks each query block reads; and that no token reads another segment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax.model.attention import Segments, attend
from persllm_jax.model.block_attention import NO_WINDOW, _first_in_window, _first_key_blocks, block_attention
from persllm_jax.model.sharding import make_mesh
from tests.attention_inputs import inputs, packed_segments, placed_like_activations, reference_mask

FWD_TOL = 1e-5  # fp32 outputs
GRAD_TOL = 1e-5  # fp32 gradients, relative to the largest gradient entry


def _dense(q, k, v, segments, window=None, scale=None):
    return attend(q, k, v, jnp.asarray(reference_mask(segments, window)), "xla", scale=scale)


def _compare(q, k, v, segments, block, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL, window=None, scale=None):
    real = segments > 0
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape) * real[:, :, None, None], q.dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    def blocked(q, k, v, window):  # the window traced, as a layer scan hands it over
        return attend(q, k, v, Segments(jnp.asarray(segments), block), "xla", scale=scale, window=window)

    def loss(fn):
        return lambda q, k, v, *w: (fn(q, k, v, *w).astype(jnp.float32) * weights).sum()

    traced = jnp.int32(NO_WINDOW if window is None else window)
    ref, out = _dense(*f32, segments, window, scale), jax.jit(blocked)(q, k, v, traced)
    np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(ref)[real], atol=fwd_tol, rtol=0)
    assert not np.asarray(out, np.float32)[~real].any(), "a padding query must give zeros"
    dense = loss(lambda q, k, v: _dense(q, k, v, segments, window, scale))
    ref_grads = jax.grad(dense, argnums=(0, 1, 2))(*f32)
    grads = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v, traced)
    for name, g, r in zip("qkv", grads, ref_grads):
        scale = float(np.abs(np.asarray(r)).max())
        g = np.asarray(g, np.float32)
        np.testing.assert_allclose(g, np.asarray(r), atol=grad_tol * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "n, k, t, block",
    [(4, 4, 128, 32), (4, 2, 200, 64), (4, 1, 96, 32), (2, 2, 640, 128), (4, 2, 64, 256)],
    ids=["mha", "gqa-partial-block", "mqa", "five-blocks", "one-block"],
)
def test_one_sequence_per_row_equals_dense(n, k, t, block):
    q, key, v = inputs(2, t, n, k, 16)
    lengths = np.asarray([t, t // 2 + 3])
    segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    _compare(q, key, v, segments, block)


@pytest.mark.parametrize("block", [16, 64, 256])
def test_packed_segments_equal_dense(block):
    q, key, v = inputs(3, 256, 4, 2, 32, seed=2)
    segments = packed_segments(3, 256, seed=2, most=12)
    assert (segments.max(axis=1) >= 4).any(), "the test needs rows of several segments"
    _compare(q, key, v, segments, block)


def test_a_segment_id_that_comes_back_later_in_a_row_is_still_one_segment():
    """The dense mask joins every token of an id, even apart; the block ranges must cover that."""
    q, key, v = inputs(1, 128, 2, 2, 16, seed=4)
    segments = np.zeros((1, 128), np.int32)
    segments[0, :20], segments[0, 20:90], segments[0, 90:120] = 1, 2, 1
    _compare(q, key, v, segments, 16)


def test_bf16_inputs_track_fp32_dense():
    q, key, v = inputs(2, 256, 4, 2, 32, seed=5, dtype=jnp.bfloat16)
    segments = packed_segments(2, 256, seed=5, most=8)
    # bf16 inputs and probabilities against fp32 throughout: bf16 has 8 bits of mantissa (2^-8 = 0.4%)
    _compare(q, key, v, segments, 64, fwd_tol=0.05, grad_tol=0.02)


def test_key_blocks_read_are_those_the_segments_need():
    segments = np.zeros((2, 256), np.int32)
    segments[0, :10], segments[0, 10:200], segments[0, 200:256] = 1, 2, 3
    segments[1, :140], segments[1, 140:150] = 1, 2  # then padding
    first = np.asarray(_first_key_blocks(jnp.asarray(segments), 32))
    # query block 0 and 1: from 0; blocks 2-4 (64..159): row 1's segment 1 starts at 0, so 0;
    # blocks 5, 6 (160..223): row 0's segment 2 starts at 10 (block 0); block 7 (224..255): segment 3
    # starts at 200 (block 6), row 1 is padding there
    assert first.tolist() == [0, 0, 0, 0, 0, 0, 0, 6]
    # row 1 alone: its padding blocks (from 160) read nothing (the number of blocks, 8)
    lone = np.asarray(_first_key_blocks(jnp.asarray(segments[1:]), 32))
    assert lone.tolist() == [0, 0, 0, 0, 0, 8, 8, 8]
    short = np.repeat(np.arange(1, 9), 32)[None].astype(np.int32)  # one segment per block
    assert np.asarray(_first_key_blocks(jnp.asarray(short), 32)).tolist() == list(range(8))
    padding = np.zeros((1, 64), np.int32)
    assert np.asarray(_first_key_blocks(jnp.asarray(padding), 32)).tolist() == [2, 2]  # reads none


def test_no_token_reads_another_segment():
    q, key, v = inputs(1, 192, 2, 2, 16, seed=6)
    segments = np.zeros((1, 192), np.int32)
    segments[0, :50], segments[0, 50:130], segments[0, 130:180] = 1, 2, 3
    middle = np.flatnonzero(segments[0] == 2)

    def others(k, v):
        out = block_attention(q, k, v, jnp.asarray(segments), 32)
        return (out[0, segments[0] != 2] ** 2).sum()

    dk, dv = jax.grad(others, argnums=(0, 1))(key, v)
    assert np.abs(np.asarray(dk)).max() > 0 and np.abs(np.asarray(dv)).max() > 0
    assert not np.asarray(dk)[0, middle].any() and not np.asarray(dv)[0, middle].any()


@pytest.mark.parametrize("mesh_shape, kv_heads", [((2, 2, 2), 2), ((1, 4, 2), 1)])
def test_sharded_over_a_mesh_equals_dense(mesh_shape, kv_heads):
    mesh = make_mesh(*mesh_shape)
    q, key, v = inputs(8, 128, 4, kv_heads, 16, seed=3)
    segments = packed_segments(8, 128, seed=3, most=6)
    with jax.set_mesh(mesh):
        q, key, v = (jax.device_put(x, placed_like_activations(x, mesh)) for x in (q, key, v))
        _compare(q, key, v, segments, 32)


@pytest.mark.parametrize("window, block", [(2, 32), (40, 32), (64, 64), (100, 16), (300, 64)])
def test_a_sliding_window_equals_dense_with_the_window_mask(window, block):
    """Packed rows and a window of 2 tokens, shorter than a block, a whole block, across several blocks
    and longer than the rows; a score scale other than head_dim ** -0.5 (Gemma's)."""
    q, key, v = inputs(2, 256, 4, 2, 16, seed=7)
    segments = packed_segments(2, 256, seed=7, most=3)
    _compare(q, key, v, segments, block, window=window, scale=0.2)


def test_key_blocks_before_the_window_are_skipped():
    """Query block i starts its key loop at the block holding key i * block - window + 1."""
    starts = [int(_first_in_window(i, 40, 32)) for i in range(6)]
    # block 2 (queries 64..95): the first query reads keys 25..64, so key block 0 is still read;
    # block 3 (96..127): keys from 57 (block 1); block 5 (160..191): keys from 121 (block 3)
    assert starts == [0, 0, 0, 1, 2, 3]
    assert int(_first_in_window(7, NO_WINDOW, 32)) == 0
