"""The DPO loss of a batch, unpacked or packed: per-pair losses and rewards from the policy's and
the reference's summed answer log-probs, and the metrics TRL logs, sliced by persona, stage and
how each pair was mined."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from persllm_jax import losses
from persllm_jax.train.batches import DPOBatch, PackedDPOBatch, SFTBatch
from persllm_jax.train.config import DPOSection
from persllm_jax.train.tasks import common
from persllm_jax.train.tasks.dpo_packing import packed_pair_logps
from persllm_jax.train.tasks.sft import sequence_nll


def pair_logps(model, chosen: SFTBatch, rejected: SFTBatch, chunk_size: int, dropout_key=None):
    """Summed answer log-probs and answer lengths, chosen and rejected in one forward pass:
    (chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B])."""
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r]), chosen, rejected)
    nll, count = sequence_nll(model, both, chunk_size, dropout_key)
    pairs = chosen.input_ids.shape[0]
    return -nll[:pairs], -nll[pairs:], count[:pairs], count[pairs:]


def preference_loss(policy_c, policy_r, ref_c, ref_r, len_c, len_r, *, beta, loss_type, label_smoothing):
    """Per-pair DPO losses and rewards. IPO compares length-normalized log-ratios; the rewards
    (and every other loss type) use summed log-probs, as TRL logs them."""
    if loss_type == "ipo":
        n_c, n_r = jnp.maximum(len_c, 1.0), jnp.maximum(len_r, 1.0)
        inputs = (policy_c / n_c, policy_r / n_r, ref_c / n_c, ref_r / n_r)
    else:
        inputs = (policy_c, policy_r, ref_c, ref_r)
    loss_B, _, _ = losses.dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    chosen_B, rejected_B = losses.dpo_rewards(policy_c, policy_r, ref_c, ref_r, beta=beta)
    return loss_B, chosen_B, rejected_B


def chosen_nll(policy_c, len_c):
    """The chosen answers' negative log-likelihood per token, over all chosen tokens of the batch
    (TRL's `sft` loss term: a token mean, so a long answer counts by its length)."""
    return -policy_c.sum() / jnp.maximum(len_c.sum(), 1.0)


# The per-step DPO metrics besides the loss, under the names TRL logs them, so that runs of either
# trainer can be read by the same tools.
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def metric_sums(chosen_B, rejected_B, policy_c, policy_r) -> dict:
    """`DPO_METRICS` summed over pairs (divide by the number of pairs for TRL's means)."""
    per_pair = (
        chosen_B,
        rejected_B,
        (chosen_B > rejected_B).astype(jnp.float32),
        chosen_B - rejected_B,
        jax.lax.stop_gradient(policy_c),
        jax.lax.stop_gradient(policy_r),
    )
    return {name: values.sum() for name, values in zip(DPO_METRICS, per_pair, strict=True)}


def dpo_batch_loss(
    model,
    batch: DPOBatch | PackedDPOBatch,
    reference,
    *,
    dpo: DPOSection,
    chunk_size: int,
    num_personas: int = 0,
    num_stages: int = 0,
    num_sources: int = 0,
    dropout_key=None,
):
    """(summed per-pair losses, number of pairs, metric sums incl. per-persona / stage / pair-source
    slices). `reference` is a frozen model, or None to use the cached log-probs carried by the batch.
    `dropout_key` drops part of the policy's adapter inputs (the reference never drops)."""
    if isinstance(batch, PackedDPOBatch):
        pairs = batch.valid.shape[1]

        def logps(m, key=None):
            return packed_pair_logps(m, batch.chosen, batch.rejected, pairs, chunk_size, key)

        valid = batch.valid.reshape(-1)
        persona_ids, stage_ids = batch.persona_ids.reshape(-1), batch.stage_ids.reshape(-1)
        source_ids = batch.source_ids.reshape(-1)
        tokens = batch.chosen.attention_mask.sum() + batch.rejected.attention_mask.sum()
        cut = (batch.chosen.length > batch.chosen.input_ids.shape[1]).sum()
    else:

        def logps(m, key=None):
            return pair_logps(m, batch.chosen, batch.rejected, chunk_size, key)

        valid = batch.chosen.loss_mask.any(-1)  # a real pair trains at least one token; padding rows none
        persona_ids, stage_ids = batch.chosen.persona_ids, batch.chosen.stage_ids
        source_ids = jnp.full_like(persona_ids, -1) if batch.source_ids is None else batch.source_ids
        tokens = batch.chosen.attention_mask.sum() + batch.rejected.attention_mask.sum()
        seq_len = batch.chosen.input_ids.shape[1]
        cut = ((batch.chosen.length > seq_len) | (batch.rejected.length > seq_len)).sum()
    policy_c, policy_r, len_c, len_r = (x.reshape(-1) for x in logps(model, dropout_key))
    if reference is not None:
        ref_c, ref_r = (x.reshape(-1) for x in jax.lax.stop_gradient(logps(reference)[:2]))
    else:
        ref_c, ref_r = batch.ref_chosen_logps.reshape(-1), batch.ref_rejected_logps.reshape(-1)
    loss_B, chosen_B, rejected_B = preference_loss(
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        len_c,
        len_r,
        beta=dpo.beta,
        loss_type=dpo.loss_type,
        label_smoothing=dpo.label_smoothing,
    )
    weight = valid.astype(jnp.float32)
    loss_B, chosen_B, rejected_B = loss_B * weight, chosen_B * weight, rejected_B * weight
    sums = {
        "tokens": tokens.astype(jnp.float32),
        "truncated": cut.astype(jnp.float32),
        **metric_sums(chosen_B, rejected_B, policy_c * weight, policy_r * weight),
    }
    total = loss_B.sum()
    if dpo.sft_weight:
        nll = chosen_nll(policy_c * weight, len_c * weight)
        # the step divides by the number of pairs: a token mean times the pairs stays a token mean
        total = total + dpo.sft_weight * nll * weight.sum()
        sums["nll_loss"] = jax.lax.stop_gradient(nll) * weight.sum()
    correct_B = ((chosen_B > rejected_B) & valid).astype(jnp.float32)
    margin_B = chosen_B - rejected_B
    groups = (
        ("persona", persona_ids, num_personas),
        ("stage", stage_ids, num_stages),
        ("source", source_ids, num_sources),
    )
    for kind, ids, count in groups:
        ids = jnp.where(valid, ids, -1)
        sums[f"{kind}_count"] = common.segment_sums(weight, ids, count)
        sums[f"{kind}_accuracies"] = common.segment_sums(correct_B, ids, count)
        sums[f"{kind}_margins"] = common.segment_sums(margin_B, ids, count)
        sums[f"{kind}_loss"] = common.segment_sums(jax.lax.stop_gradient(loss_B), ids, count)
    return total, weight.sum(), sums
