"""Training losses: DPO variants (TRL's formulas and metric conventions) and memory-lean token log-probs.

`token_logps` never materializes the [B, T, V] logits: it scores the sequence chunk by chunk, and each
chunk is rematerialized in the backward pass, so the live logits are at most [B, chunk, V].
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


def token_logps(hidden_BTD, kernel_DV, targets_BT, chunk_size=256):
    """Log-probability [B, T] (float32) of each target token under softmax(hidden @ kernel), by chunks.

    The matmul runs in hidden's dtype with float32 accumulation, so bfloat16 hidden states and a float32
    kernel (`CausalLM.output_kernel()`) give what `CausalLM.logits_from_hidden` computes.
    """
    b, t, d = hidden_BTD.shape
    c = max(1, min(chunk_size, t))  # a short sequence is one chunk, not padded up to chunk_size
    n = -(-t // c)
    pad = n * c - t
    # Padded positions score target 0 on zero hidden states: finite, and cut off below.
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    hidden_NBCD = hidden_BTD.reshape(b, n, c, d).transpose(1, 0, 2, 3)
    targets_NBC = targets_BT.reshape(b, n, c).transpose(1, 0, 2)

    # Checkpointed so the backward pass recomputes each chunk's logits instead of keeping n of them.
    chunk_fn = jax.checkpoint(_chunk_logps, prevent_cse=False)
    logps_NBC = jax.lax.map(lambda xs: chunk_fn(xs[0], kernel_DV, xs[1]), (hidden_NBCD, targets_NBC))
    return logps_NBC.transpose(1, 0, 2).reshape(b, n * c)[:, :t]
