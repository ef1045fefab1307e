"""Batches as they enter the jitted step. Every array's leading axis is the global batch.

Padding is on the right. `targets[b, t]` is the token after `input_ids[b, t]`; `loss_mask[b, t]`
says that target is trained on (an assistant token, or any token for plain text); padding has
`attention_mask` False and `loss_mask` False. `persona_ids` / `stage_ids` index the run's
persona and stage names (-1 = none) and only slice metrics; `length` only counts truncation.

A packed row holds several sequences: `segment_ids` numbers them 1, 2, ... (0 = padding) and
`positions` restarts at 0 in each, so a token attends only to its own sequence; the per-token
`persona_ids`, `stage_ids` and `length` (each sequence's token count before cutting, at its
first token, 0 elsewhere) then say which sequence a token belongs to. An unpacked batch may
leave `segment_ids` and `positions` None and give per-row `persona_ids`, `stage_ids`, `length`.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class SFTBatch:
    input_ids: jax.Array  # [B, T] int32
    targets: jax.Array  # [B, T] int32
    loss_mask: jax.Array  # [B, T] bool
    attention_mask: jax.Array  # [B, T] bool
    persona_ids: jax.Array  # [B] or [B, T] int32
    stage_ids: jax.Array  # [B] or [B, T] int32
    length: jax.Array  # [B] or [B, T] int32, tokens before the sequence was cut to T (> T: it was cut)
    segment_ids: jax.Array | None = None  # [B, T] int32, packed rows
    positions: jax.Array | None = None  # [B, T] int32, packed rows


@struct.dataclass
class DPOBatch:
    chosen: SFTBatch  # prompt + chosen answer; loss_mask marks the answer
    rejected: SFTBatch  # prompt + rejected answer
    ref_chosen_logps: jax.Array  # [B] float32, summed over the answer (cached reference pass)
    ref_rejected_logps: jax.Array  # [B] float32
    source_ids: jax.Array | None = None  # [B] int32, how each pair was mined (-1 = not said)


@struct.dataclass
class PackedDPOBatch:
    """Several pairs per row, packed in lockstep: segment k of `chosen[b]` ([B, T], prompt +
    chosen) and segment k of `rejected[b]` (prompt + rejected) are pair slot k of row b, each
    attending only to itself; the per-pair arrays are [B, P], P = the most pairs a row holds,
    `valid` False on empty slots."""

    chosen: SFTBatch
    rejected: SFTBatch
    ref_chosen_logps: jax.Array  # [B, P] float32
    ref_rejected_logps: jax.Array  # [B, P] float32
    valid: jax.Array  # [B, P] bool
    persona_ids: jax.Array  # [B, P] int32
    stage_ids: jax.Array  # [B, P] int32
    source_ids: jax.Array  # [B, P] int32
