"""Training losses: DPO variants (TRL's formulas and metric conventions) and memory-lean token log-probs.

`token_logps` never materializes the [B, T, V] logits: it scores the sequence chunk by chunk, and each
chunk is rematerialized in the backward pass, so the live logits are at most [B, chunk, V]. Given the
positions a loss reads, it scores only those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


# ---------------------------------------------------------------------------------------------
# DPO.


def dpo_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """TRL's implicit rewards beta * (policy - ref) for chosen and rejected, without gradient."""
    chosen_rewards = beta * jax.lax.stop_gradient(policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * jax.lax.stop_gradient(policy_rejected_logps - ref_rejected_logps)
    return chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
):
    """Per-pair DPO losses [B] and implicit rewards [B], [B] from sequence log-probs [B].

    For `ipo` pass length-normalized log-probs (each sum divided by its completion's token count); the
    returned rewards are then on
    that per-token scale, whereas TRL logs rewards from summed log-probs (use `dpo_rewards` for those).
    `label_smoothing` applies to `sigmoid` (cDPO) and `robust`; `ipo` and `hinge` ignore it.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if (
        loss_type == "robust"
        and isinstance(label_smoothing, (int, float))
        and not 0.0 <= label_smoothing < 0.5
    ):
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    losses = _DPO_LOSSES[loss_type](delta, beta, label_smoothing)
    chosen_rewards, rejected_rewards = dpo_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return losses, chosen_rewards, rejected_rewards


def _sigmoid_loss(delta, beta, eps):
    """cDPO: the preference label is flipped with probability eps (eps = 0 is plain DPO)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)


def _ipo_loss(delta, beta, eps):
    """IPO: squared distance of the (length-normalized) log-ratio margin from 1 / (2 beta)."""
    del eps
    return (delta - 1.0 / (2.0 * beta)) ** 2


def _hinge_loss(delta, beta, eps):
    """SLiC hinge on the scaled margin."""
    del eps
    return jax.nn.relu(1.0 - beta * delta)


def _robust_loss(delta, beta, eps):
    """Robust DPO: an unbiased estimate of the clean loss under label-flip rate eps."""
    clean = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
    flipped = -eps * jax.nn.log_sigmoid(-beta * delta)
    return (clean - flipped) / (1.0 - 2.0 * eps)


_DPO_LOSSES = {"sigmoid": _sigmoid_loss, "ipo": _ipo_loss, "hinge": _hinge_loss, "robust": _robust_loss}


# ---------------------------------------------------------------------------------------------
# Token log-probabilities.


def _chunk_logps(hidden_BCD, kernel_DV, targets_BC):
    """log softmax(hidden @ kernel)[target] in float32 for one chunk; the matmul runs in hidden's dtype."""
    # Casting here rather than before the loop keeps the kernel's cotangent accumulating across chunks in
    # the kernel's own dtype (float32 parameters), not in a bfloat16 copy.
    kernel_DV = kernel_DV.astype(hidden_BCD.dtype)
    logits_BCV = jnp.einsum("bcd,dv->bcv", hidden_BCD, kernel_DV, preferred_element_type=jnp.float32)
    log_z_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_logits_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    return target_logits_BC - log_z_BC


def token_logps_plain(hidden_BTD, kernel_DV, targets_BT):
    """Log-probability of each target token [B, T], materializing the full logits (test reference)."""
    return _chunk_logps(hidden_BTD, kernel_DV, targets_BT)


def token_logps(hidden_BTD, kernel_DV, targets_BT, chunk_size=256, where_BT=None):
    """Log-probability [B, T] (float32) of each target token under softmax(hidden @ kernel), by chunks.

    The matmul runs in hidden's dtype with float32 accumulation, so bfloat16 hidden states and a float32
    kernel (`CausalLM.output_kernel()`) give what `CausalLM.logits_from_hidden` computes.

    `where_BT` (bool) limits the work to the positions a loss reads (an answer's tokens): each row's
    marked positions are moved to its front, in order, and only the chunks that hold a marked position
    of some row run (a loop whose trip count is read on the device), so one compiled step serves
    every batch layout. Unmarked positions then give 0. On persona data the vocabulary projection is
    most of a small model's work, and half or more of a row is prompt.
    """
    if where_BT is None:
        return _chunked_logps(hidden_BTD, kernel_DV, targets_BT, chunk_size, None)
    b, t = targets_BT.shape
    order_BT = jnp.argsort(~where_BT, axis=-1, stable=True)  # marked positions first, in order
    hidden_BTD = jnp.take_along_axis(hidden_BTD, order_BT[..., None], axis=1)
    targets_BT = jnp.take_along_axis(targets_BT, order_BT, axis=1)
    logps_BT = _chunked_logps(hidden_BTD, kernel_DV, targets_BT, chunk_size, where_BT.sum(-1).max())
    # Back to the original positions: position order[b, i] holds the i-th compacted value.
    rows_B1 = jnp.arange(b)[:, None]
    back_BT = jnp.zeros((b, t), jnp.int32).at[rows_B1, order_BT].set(jnp.arange(t, dtype=jnp.int32)[None])
    return jnp.where(where_BT, jnp.take_along_axis(logps_BT, back_BT, axis=1), 0.0)


def _chunked_logps(hidden_BTD, kernel_DV, targets_BT, chunk_size, needed):
    """`token_logps` over positions in chunks; with `needed` (a traced count), only the first
    `needed` positions of each row are wanted, and chunks past them are not computed (giving 0)."""
    b, t, d = hidden_BTD.shape
    c = max(1, min(chunk_size, t))  # a short sequence is one chunk, not padded up to chunk_size
    n = -(-t // c)
    pad = n * c - t
    # Padded positions score target 0 on zero hidden states: finite, and cut off below.
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    hidden_NBCD = hidden_BTD.reshape(b, n, c, d).transpose(1, 0, 2, 3)
    targets_NBC = targets_BT.reshape(b, n, c).transpose(1, 0, 2)
    chunks = jnp.int32(n) if needed is None else jnp.minimum(-(-needed // c), n).astype(jnp.int32)
    logps_NBC = _scored_chunks(hidden_NBCD, kernel_DV, targets_NBC, chunks)
    return logps_NBC.transpose(1, 0, 2).reshape(b, n * c)[:, :t]


# The chunk loop has a traced trip count, so it is a `while` loop, which reverse-mode autodiff does not
# go through; the custom VJP runs the backward as a second loop over the same chunks, recomputing each
# chunk's logits instead of keeping them (what `jax.checkpoint` per chunk gave), and differentiating each
# chunk with `jax.vjp` of `_chunk_logps`, so a chunk's gradients are exactly what autodiff computes.


@jax.custom_vjp
def _scored_chunks(hidden_NBCD, kernel_DV, targets_NBC, chunks):
    """Log-probs [N, B, C] of the first `chunks` chunks (0 for the rest)."""
    return _scored_chunks_fwd(hidden_NBCD, kernel_DV, targets_NBC, chunks)[0]


def _scored_chunks_fwd(hidden_NBCD, kernel_DV, targets_NBC, chunks):
    def one_chunk(j, logps_NBC):
        logps_BC = _chunk_logps(hidden_NBCD[j], kernel_DV, targets_NBC[j])
        return jax.lax.dynamic_update_index_in_dim(logps_NBC, logps_BC, j, axis=0)

    logps_NBC = jax.lax.fori_loop(0, chunks, one_chunk, jnp.zeros(targets_NBC.shape, jnp.float32))
    return logps_NBC, (hidden_NBCD, kernel_DV, targets_NBC, chunks)


def _scored_chunks_bwd(residuals, d_logps_NBC):
    hidden_NBCD, kernel_DV, targets_NBC, chunks = residuals

    def one_chunk(j, grads):
        d_hidden_NBCD, d_kernel_DV = grads
        _, chunk_vjp = jax.vjp(lambda h, k: _chunk_logps(h, k, targets_NBC[j]), hidden_NBCD[j], kernel_DV)
        d_hidden_BCD, d_kernel = chunk_vjp(d_logps_NBC[j])
        d_hidden_NBCD = jax.lax.dynamic_update_index_in_dim(d_hidden_NBCD, d_hidden_BCD, j, axis=0)
        return d_hidden_NBCD, d_kernel_DV + d_kernel

    init = (jnp.zeros_like(hidden_NBCD), jnp.zeros_like(kernel_DV))
    d_hidden_NBCD, d_kernel_DV = jax.lax.fori_loop(0, chunks, one_chunk, init)
    return d_hidden_NBCD, d_kernel_DV, None, None


_scored_chunks.defvjp(_scored_chunks_fwd, _scored_chunks_bwd)
