"""Packed DPO: several preference pairs per row, both sides of a pair in the same row.

A pair enters the input pipeline as one element (prompt + chosen, then prompt + rejected), so the
packer never splits it; in the batch, pair slot k of a row is segments 2k + 1 (chosen) and 2k + 2
(rejected), each attending only to itself with its own positions, and the sequence log-probs are
summed per segment. Per-pair arrays (reference log-probs, metric groups) are [rows, P] with a
validity mask, P = `train.max_segments`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.data import chat_tokenize
from persllm_jax.train.batches import PackedDPOBatch, SFTBatch
from persllm_jax.train.tasks import sft
from persllm_jax.train.tasks.sft import token_logps

# The per-token arrays of one pair in the packed input pipeline: prompt + chosen, then prompt +
# rejected, `side` 1 / 2, each side's own positions, the cached reference log-prob of each side at
# its first token, and where the pair was read (for the reference pass).
PACKED_FEATURES = (
    "input_ids",
    "targets",
    "loss_mask",
    "persona",
    "stage",
    "length",
    "side",
    "token_positions",
    "ref_logp",
    "key_source",
    "key_index",
    "pair_source",
)


def packed_pair_features(
    pair: chat_tokenize.TokenizedPair, key, persona: int, stage: int, ref, source: int = -1
) -> dict:
    """One pair as a packed element; `ref` = (chosen, rejected) reference log-probs or None;
    `source` the id of how the pair was mined (-1: not said)."""
    sides = [sft.sequence_features(arrays, persona, stage) for arrays in (pair.chosen, pair.rejected)]
    out = {name: np.concatenate([side[name] for side in sides]) for name in sides[0]}
    n_c, n_r = (len(side["input_ids"]) for side in sides)
    out["length"][:] = 0
    out["length"][0] = max(int(pair.chosen.length), int(pair.rejected.length))  # a cut pair counts once
    out["side"] = np.repeat(np.asarray([1, 2], np.int32), [n_c, n_r])
    out["token_positions"] = np.concatenate([np.arange(n_c), np.arange(n_r)]).astype(np.int32)
    out["ref_logp"] = np.zeros(n_c + n_r, np.float32)
    if ref is not None:
        out["ref_logp"][0], out["ref_logp"][n_c] = ref
    out["key_source"] = np.full(n_c + n_r, key[0], np.int32)
    out["key_index"] = np.full(n_c + n_r, key[1], np.int32)
    out["pair_source"] = np.full(n_c + n_r, source + 1, np.int32)
    return out


def packed_batch(rows: dict, max_pairs: int) -> tuple[PackedDPOBatch, np.ndarray]:
    """Stacked packed rows -> a PackedDPOBatch, and the [B, P, 2] (source, index) of each slot
    (-1 on empty slots)."""
    pair_BT, side_BT = rows["segment_ids"], rows["side"]
    b = pair_BT.shape[0]
    segments = np.where(pair_BT > 0, 2 * (pair_BT - 1) + side_BT, 0).astype(np.int32)
    tokens = SFTBatch(
        input_ids=rows["input_ids"],
        targets=rows["targets"],
        loss_mask=rows["loss_mask"],
        attention_mask=pair_BT > 0,
        persona_ids=rows["persona"] - 1,
        stage_ids=rows["stage"] - 1,
        length=rows["length"],
        segment_ids=segments,
        positions=rows["token_positions"],
    )
    slot = np.where(pair_BT > 0, pair_BT - 1, max_pairs)  # max_pairs: padding's bin, dropped
    row = np.broadcast_to(np.arange(b)[:, None], slot.shape)
    chosen = side_BT == 1

    def per_slot(values, where, fill, dtype):
        out = np.full((b, max_pairs + 1), fill, dtype)
        out[row[where], slot[where]] = values[where]
        return out[:, :max_pairs]

    first = np.zeros_like(chosen)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first[:, 0] = segments[:, 0] > 0
    ref_c = per_slot(rows["ref_logp"], first & chosen, 0.0, np.float32)
    ref_r = per_slot(rows["ref_logp"], first & (side_BT == 2), 0.0, np.float32)
    valid = per_slot(np.ones_like(chosen), chosen, False, bool)
    persona = per_slot(rows["persona"] - 1, chosen, -1, np.int32)
    stage = per_slot(rows["stage"] - 1, chosen, -1, np.int32)
    source = per_slot(rows["pair_source"] - 1, chosen, -1, np.int32)
    keys = np.stack(
        [
            per_slot(rows["key_source"], chosen, -1, np.int64),
            per_slot(rows["key_index"], chosen, -1, np.int64),
        ],
        axis=-1,
    )
    batch = PackedDPOBatch(
        tokens=tokens, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, valid=valid,
        persona_ids=persona, stage_ids=stage, source_ids=source,
    )  # fmt: skip
    return batch, keys


def packed_pair_logps(model, tokens: SFTBatch, max_pairs: int, chunk_size: int):
    """Summed answer log-probs and answer lengths of every pair slot, one forward pass over the
    packed rows: (chosen_logps [B, P], rejected_logps, chosen_lengths, rejected_lengths)."""
    b = tokens.input_ids.shape[0]
    mask = tokens.loss_mask.astype(jnp.float32)
    logps = token_logps(model, tokens, chunk_size) * mask
    bins = 2 * max_pairs + 1  # slot k's chosen, rejected at 2k, 2k + 1; padding in the last
    local = jnp.where(tokens.segment_ids > 0, tokens.segment_ids - 1, 2 * max_pairs)
    flat = (jnp.arange(b, dtype=jnp.int32)[:, None] * bins + local).reshape(-1)

    def per_slot(values_BT):
        sums = jax.ops.segment_sum(values_BT.reshape(-1), flat, b * bins).reshape(b, bins)
        return sums[:, : 2 * max_pairs].reshape(b, max_pairs, 2)

    summed, counts = per_slot(logps), per_slot(mask)
    return summed[..., 0], summed[..., 1], counts[..., 0], counts[..., 1]
