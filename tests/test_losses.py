"""DPO losses against float64 formulas, and chunked token log-probs against the materialized ones."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persllm_jax import losses

# ---------------------------------------------------------------------------------------------
# DPO losses.


def _log_sigmoid64(x):
    return -np.logaddexp(0.0, -x)


def _reference_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """TRL's DPO formulas in float64 numpy, written independently of persllm_jax.losses."""
    delta = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        loss = -(1 - eps) * _log_sigmoid64(beta * delta) - eps * _log_sigmoid64(-beta * delta)
    elif loss_type == "ipo":
        loss = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = np.maximum(0.0, 1 - beta * delta)
    elif loss_type == "robust":
        loss = (-(1 - eps) * _log_sigmoid64(beta * delta) + eps * _log_sigmoid64(-beta * delta)) / (
            1 - 2 * eps
        )
    return loss, beta * (pc - rc), beta * (pr - rr)


def _random_logps(seed, n=16, scale=3.0):
    """Sequence log-probs whose deltas are O(1): a wrong sign or factor is visible at 1e-6."""
    rng = np.random.RandomState(seed)
    base = -rng.uniform(20.0, 80.0, size=(4, n))
    return base + scale * rng.randn(4, n)


@pytest.mark.parametrize(
    "loss_type,label_smoothing",
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.1),
        ("sigmoid", 0.3),
        ("ipo", 0.0),
        ("hinge", 0.0),
        ("robust", 0.0),
        ("robust", 0.1),
        ("robust", 0.3),
    ],
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_float64_formula(loss_type, label_smoothing, beta):
    logps64 = _random_logps(seed=11)
    if loss_type == "ipo":  # ipo takes length-normalized log-probs
        logps64 = logps64 / 17.0
    logps32 = [jnp.asarray(x, jnp.float32) for x in logps64]
    # The float64 reference takes the float32-rounded inputs, so only the arithmetic is compared.
    ref_inputs = [np.asarray(x, np.float64) for x in logps32]
    got = losses.dpo_loss(*logps32, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    want = _reference_dpo(*ref_inputs, beta, loss_type, label_smoothing)
    for name, g, w in zip(("losses", "chosen_rewards", "rejected_rewards"), got, want):
        assert g.shape == (16,) and g.dtype == jnp.float32, name
        # float32 differences of numbers ~50 carry ~4e-6 absolute error; compare relative to the loss scale.
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_dpo_loss_matches_formula_in_float64(loss_type):
    """With x64 enabled the implementation is the formula to 1e-12 (no float32 rounding to hide behind)."""
    with jax.enable_x64(True):
        logps = _random_logps(seed=7)
        got = losses.dpo_loss(*map(jnp.asarray, logps), beta=0.2, loss_type=loss_type, label_smoothing=0.1)
        want = _reference_dpo(*logps, 0.2, loss_type, 0.1)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-12, atol=1e-12)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = jnp.asarray(_random_logps(seed=3)[0], jnp.float32)
    for eps in (0.0, 0.1):
        loss, chosen_rewards, rejected_rewards = losses.dpo_loss(
            logps, logps - 5.0, logps, logps - 5.0, beta=0.1, label_smoothing=eps
        )
        np.testing.assert_allclose(np.asarray(loss), np.log(2.0), rtol=0, atol=1e-7)
        assert np.all(np.asarray(chosen_rewards) == 0.0) and np.all(np.asarray(rejected_rewards) == 0.0)


def test_dpo_rewards_carry_no_gradient():
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _random_logps(seed=5, n=4))

    def rewards_sum(pc, pr):
        _, chosen, rejected = losses.dpo_loss(pc, pr, rc, rr)
        return jnp.sum(chosen + rejected)

    grads = jax.grad(rewards_sum, argnums=(0, 1))(pc, pr)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_dpo_sigmoid_gradient_is_beta_weighted_sigmoid():
    """d loss / d pi_c = -beta * sigmoid(-beta * Delta): the DPO update direction."""
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in _random_logps(seed=6, n=8))
    grad = jax.grad(lambda pc: jnp.sum(losses.dpo_loss(pc, pr, rc, rr, beta=0.1)[0]))(pc)
    delta = np.asarray((pc - rc) - (pr - rr), np.float64)
    np.testing.assert_allclose(np.asarray(grad), -0.1 / (1 + np.exp(0.1 * delta)), rtol=1e-5, atol=1e-7)


def test_dpo_loss_rejects_unknown_type_and_bad_smoothing():
    x = jnp.zeros((2,))
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        losses.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_dpo_loss_is_stable_for_large_margins():
    big = jnp.asarray([1e4, -1e4], jnp.float32)
    zero = jnp.zeros((2,), jnp.float32)
    loss, _, _ = losses.dpo_loss(big, zero, zero, zero, beta=1.0)
    assert np.all(np.isfinite(np.asarray(loss)))
    np.testing.assert_allclose(np.asarray(loss), [0.0, 1e4], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Chunked token log-probs.


def _problem(b, t, d, v, dtype, seed=0):
    rng = np.random.RandomState(seed)
    hidden = jnp.asarray(rng.randn(b, t, d), jnp.float32).astype(dtype)
    kernel = jnp.asarray(0.3 * rng.randn(d, v), jnp.float32)  # logits of a few units
    targets = jnp.asarray(rng.randint(0, v, (b, t)), jnp.int32)
    mask = jnp.asarray(rng.rand(b, t) > 0.3)
    return hidden, kernel, targets, mask


def _masked_sum(fn, targets, mask):
    return lambda hidden, kernel: jnp.sum(jnp.where(mask, fn(hidden, kernel, targets), 0.0))


def _chunked(chunk_size):
    return lambda h, k, t: losses.token_logps(h, k, t, chunk_size=chunk_size)


def test_plain_token_logps_is_log_softmax():
    hidden, kernel, targets, _ = _problem(2, 9, 8, 30, jnp.float32)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(losses.token_logps_plain(hidden, kernel, targets)), want, atol=1e-5)


@pytest.mark.parametrize(
    "t,chunk_size",
    [(64, 16), (100, 32), (37, 8), (5, 256), (1, 4)],  # multiples, ragged T, T below one chunk
)
def test_chunked_token_logps_match_plain_fp32(t, chunk_size):
    hidden, kernel, targets, mask = _problem(3, t, 24, 77, jnp.float32)
    chunked, plain = _chunked(chunk_size), losses.token_logps_plain
    got, want = chunked(hidden, kernel, targets), plain(hidden, kernel, targets)
    assert got.shape == (3, t) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)

    grads = jax.grad(_masked_sum(chunked, targets, mask), argnums=(0, 1))(hidden, kernel)
    want_grads = jax.grad(_masked_sum(plain, targets, mask), argnums=(0, 1))(hidden, kernel)
    for name, g, w in zip(("d_hidden", "d_kernel"), grads, want_grads):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.abs(np.asarray(w)).max() > 0.1, f"{name} too small to compare"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5, err_msg=name)


def test_chunked_token_logps_jit_matches_plain():
    hidden, kernel, targets, _ = _problem(2, 50, 16, 40, jnp.float32)
    got = jax.jit(losses.token_logps, static_argnames="chunk_size")(hidden, kernel, targets, chunk_size=16)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(losses.token_logps_plain(hidden, kernel, targets)), rtol=0, atol=1e-5
    )


def test_chunked_token_logps_bf16_hidden():
    """bf16 hidden states with an fp32 kernel: bf16 matmul, fp32 logits, fp32 kernel-gradient accumulation.

    Values and the hidden gradient are per-position, so they equal the plain computation to 1e-5.
    The kernel gradient is a sum over positions: the plain version rounds it to bf16 once, the
    chunked one rounds each chunk's share to bf16 (the dot's operand dtype) and accumulates in fp32,
    so they differ by about one bf16 ulp; both are compared with the fp32 truth instead.
    """
    hidden, kernel, targets, mask = _problem(2, 300, 32, 100, jnp.bfloat16)
    chunked, plain = _chunked(64), losses.token_logps_plain
    got, want = chunked(hidden, kernel, targets), plain(hidden, kernel, targets)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)

    d_hidden, d_kernel = jax.grad(_masked_sum(chunked, targets, mask), argnums=(0, 1))(hidden, kernel)
    want_hidden, want_kernel = jax.grad(_masked_sum(plain, targets, mask), argnums=(0, 1))(hidden, kernel)
    assert d_hidden.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(d_hidden, np.float32), np.asarray(want_hidden, np.float32), rtol=0, atol=1e-5
    )

    # fp32 truth: the same bf16-representable inputs, every operation in fp32.
    truth = jax.grad(_masked_sum(plain, targets, mask), argnums=1)(
        hidden.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32)
    )
    truth, d_kernel, want_kernel = (np.asarray(x, np.float64) for x in (truth, d_kernel, want_kernel))
    scale = np.abs(truth).max()
    assert np.abs(d_kernel - want_kernel).max() <= 2**-7 * scale  # within about one bf16 ulp of plain
    assert np.abs(d_kernel - truth).max() <= 1.5 * np.abs(want_kernel - truth).max()  # no worse than plain


def _largest_array_elements(hlo_text: str) -> int:
    """Element count of the largest array shape anywhere in an HLO module's text."""
    sizes = [
        int(np.prod([int(n) for n in dims.split(",")]))
        for dims in re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([0-9,]+)\]", hlo_text)
    ]
    return max(sizes)


@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "backward"])
def test_chunked_token_logps_never_materialize_full_logits(with_grad):
    """Compiled HLO (after XLA's fusion and layout passes) has no array as big as [B, T, V]."""
    b, t, v, d, chunk = 2, 1024, 32000, 64, 128
    args = (
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )
    full_logits_bytes = b * t * v * 4

    def compiled(fn):
        if with_grad:
            fn = jax.grad(lambda h, k, tg, fn=fn: jnp.sum(fn(h, k, tg)), argnums=(0, 1))
        return jax.jit(fn).lower(*args).compile()

    plain = compiled(losses.token_logps_plain)
    chunked = compiled(_chunked(chunk))
    # The check must see the full logits where they exist, or it proves nothing.
    assert _largest_array_elements(plain.as_text()) >= b * t * v
    assert _largest_array_elements(chunked.as_text()) <= b * chunk * v
    memory = chunked.memory_analysis()
    if memory is not None:  # available on CPU today; a backend without it still gets the HLO check
        assert memory.temp_size_in_bytes < full_logits_bytes / 2
        assert plain.memory_analysis().temp_size_in_bytes >= full_logits_bytes


def _marked(layout, b, t, seed=1):
    """Which positions a loss reads, in a few layouts a batch can have."""
    rng = np.random.RandomState(seed)
    mask = rng.rand(b, t) > 0.55
    if layout == "empty_and_full_rows":
        mask[0], mask[1] = False, True
    elif layout == "only_the_end":  # answers at the end of the row, as after a long prompt
        mask[:] = False
        mask[:, -7:] = True
    return jnp.asarray(mask)


@pytest.mark.parametrize("layout", ["random", "empty_and_full_rows", "only_the_end"])
@pytest.mark.parametrize("t,chunk_size", [(64, 16), (100, 32), (37, 8)])
def test_scoring_only_marked_positions_matches_plain(layout, t, chunk_size):
    """`where_BT`: the marked positions' log-probs and every gradient equal the plain ones within
    1e-5 (fp32); unmarked positions are exactly 0."""
    hidden, kernel, targets, _ = _problem(3, t, 24, 77, jnp.float32)
    where = _marked(layout, 3, t)

    def marked(h, k, tg):
        return losses.token_logps(h, k, tg, chunk_size=chunk_size, where_BT=where)

    got = jax.jit(marked)(hidden, kernel, targets)
    want = losses.token_logps_plain(hidden, kernel, targets)
    np.testing.assert_allclose(np.asarray(got), np.where(where, np.asarray(want), 0.0), rtol=0, atol=1e-5)
    assert (np.asarray(got)[~np.asarray(where)] == 0.0).all()

    grads = jax.grad(_masked_sum(marked, targets, where), argnums=(0, 1))(hidden, kernel)
    want_grads = jax.grad(_masked_sum(losses.token_logps_plain, targets, where), argnums=(0, 1))(
        hidden, kernel
    )
    for name, g, w in zip(("d_hidden", "d_kernel"), grads, want_grads):
        assert np.abs(np.asarray(w)).max() > 0.1, f"{name} too small to compare"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5, err_msg=name)


def test_chunks_without_a_marked_position_are_not_computed():
    """Hidden states that are NaN on unmarked positions only: a chunk that computed them would put
    NaN into the kernel's gradient (0 x NaN), so a finite gradient shows the chunks made only of
    unmarked positions were skipped. The first 10 positions of each row are marked, chunks hold 16,
    and the NaN start at position 16, so after moving marked positions to the front every NaN lies
    in chunks 1-3."""
    hidden, kernel, targets, _ = _problem(2, 64, 8, 30, jnp.float32)
    hidden = hidden.at[:, 16:].set(jnp.nan)
    where = jnp.zeros((2, 64), bool).at[:, :10].set(True)

    def loss(h, k):
        return jnp.sum(losses.token_logps(h, k, targets, chunk_size=16, where_BT=where))

    d_hidden, d_kernel = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, kernel)
    assert np.isfinite(np.asarray(d_kernel)).all() and np.abs(np.asarray(d_kernel)).max() > 0
    assert np.isfinite(np.asarray(d_hidden[:, :16])).all()
    # Without the mask every chunk runs, and the same inputs do give NaN: the check can fail.
    plain = jax.grad(lambda h, k: jnp.sum(jnp.where(where, losses.token_logps(h, k, targets, 16), 0.0)), 1)
    assert np.isnan(np.asarray(plain(hidden, kernel))).any()
