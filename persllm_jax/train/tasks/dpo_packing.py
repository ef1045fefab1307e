"""Packed DPO: several preference pairs per row, packed in lockstep.

A pair enters the input pipeline as one element with two sets of per-token features: prompt +
chosen (`chosen_*`) and prompt + rejected (`rejected_*`). grain's packer packs each feature into
its own row of `seq_len` and takes a pair only when both sides fit, so a row of the batch is a
chosen row and a rejected row whose segment k is the same pair; a pair never straddles a row or
a step. Attention then runs over rows of `seq_len` (2B of them), as unpacked DPO's does, not over
rows twice as long. Sequence log-probs are summed per segment into pair slots; per-pair arrays
(reference log-probs, metric groups) are [rows, P] with a validity mask, P = `train.max_segments`.

A unit of M pairs (a cross-stage pair and its mirror, `dpo.mirrors_together`) is one element: its
pairs' sides laid end to end, each token marked with its pair's number in the unit (`member`) and
its position in that pair's sequence. Packed, the element's segment s becomes the segments
(s - 1) * M + member, so the pairs of a unit share a row and a step but attend only to themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.data import chat_tokenize
from persllm_jax.train.batches import PackedDPOBatch, SFTBatch
from persllm_jax.train.tasks import sft
from persllm_jax.train.tasks.sft import token_logps

SIDE_FEATURES = ("input_ids", "targets", "loss_mask", "length", "ref_logp", "member", "member_position")
# Per-pair values, stored on every token of the chosen side (+1 where 0 must mean "none").
PAIR_FEATURES = ("persona", "stage", "pair_source", "key_source", "key_index")
PACKED_FEATURES = tuple(
    f"{side}_{name}" for side in ("chosen", "rejected") for name in SIDE_FEATURES
) + tuple(f"chosen_{name}" for name in PAIR_FEATURES)


def packed_pair_features(
    pair: chat_tokenize.TokenizedPair, key, persona: int, stage: int, ref, source: int = -1
) -> dict:
    """One pair as a packed element; `ref` = (chosen, rejected) reference log-probs or None;
    `source` the id of how the pair was mined (-1: not said)."""
    out = {}
    for number, (side, arrays) in enumerate((("chosen", pair.chosen), ("rejected", pair.rejected))):
        features = sft.sequence_features(arrays, persona, stage)
        n = len(features["input_ids"])
        ref_logp = np.zeros(n, np.float32)
        if ref is not None:
            ref_logp[0] = ref[number]
        features["ref_logp"] = ref_logp
        features["member"] = np.ones(n, np.int32)
        features["member_position"] = np.arange(n, dtype=np.int32)
        for name in SIDE_FEATURES:
            out[f"{side}_{name}"] = features[name]
    n = len(out["chosen_input_ids"])
    # a pair cut on either side counts once, at the chosen side's first token
    out["chosen_length"][0] = max(int(pair.chosen.length), int(pair.rejected.length))
    out["rejected_length"][:] = 0
    values = {"persona": persona + 1, "stage": stage + 1, "pair_source": source + 1}
    values |= {"key_source": key[0] + 1, "key_index": key[1] + 1}
    for name in PAIR_FEATURES:
        out[f"chosen_{name}"] = np.full(n, values[name], np.int32)
    return out


def packed_unit(pairs: list[dict], row_len: int) -> dict:
    """The packed elements of a unit's pairs as one element (see the module's docstring); a unit
    longer than a row is an error naming its pairs' keys."""
    out = {name: np.concatenate([pair[name] for pair in pairs]) for name in pairs[0]}
    for side in ("chosen", "rejected"):
        out[f"{side}_member"] = np.concatenate(
            [np.full(len(pair[f"{side}_input_ids"]), m + 1, np.int32) for m, pair in enumerate(pairs)]
        )
        if len(out[f"{side}_input_ids"]) > row_len:
            keys = [(int(p["chosen_key_source"][0]) - 1, int(p["chosen_key_index"][0]) - 1) for p in pairs]
            raise ValueError(
                f"the preference pairs {keys} (source, record) train together (dpo.mirrors_together) "
                f"and their {side} sides take {len(out[f'{side}_input_ids'])} tokens, more than a row "
                f"(train.seq_len={row_len}); raise train.seq_len or set dpo.mirrors_together=false"
            )
    return out


def packed_segments(rows: dict, side: str, members: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) of one side's packed rows: each pair of a packed unit its own
    segment, (packer's segment - 1) * members + member; 0 is padding."""
    packed = rows[f"{side}_input_ids_segment_ids"].astype(np.int32)
    segments = np.where(packed > 0, (packed - 1) * members + rows[f"{side}_member"], 0).astype(np.int32)
    return segments, np.where(packed > 0, rows[f"{side}_member_position"], 0).astype(np.int32)


def _side(rows: dict, side: str, members: int) -> SFTBatch:
    segments, positions = packed_segments(rows, side, members)
    no_group = np.full_like(segments, -1)
    return SFTBatch(
        input_ids=rows[f"{side}_input_ids"],
        targets=rows[f"{side}_targets"],
        loss_mask=rows[f"{side}_loss_mask"],
        attention_mask=segments > 0,
        persona_ids=no_group,
        stage_ids=no_group,
        length=rows[f"{side}_length"],
        segment_ids=segments,
        positions=positions,
    )


def packed_batch(rows: dict, max_pairs: int, members: int = 1) -> tuple[PackedDPOBatch, np.ndarray]:
    """Stacked packed rows (units of at most `members` pairs) -> a PackedDPOBatch, and the
    [B, P, 2] (source, index) of each slot (-1 on empty slots)."""
    segments = packed_segments(rows, "chosen", members)[0]
    b = segments.shape[0]
    slot = np.where(segments > 0, segments - 1, max_pairs)  # max_pairs: padding's bin, dropped
    row = np.broadcast_to(np.arange(b)[:, None], slot.shape)
    real = segments > 0

    def per_slot(values, fill, dtype):
        out = np.full((b, max_pairs + 1), fill, dtype)
        out[row[real], slot[real]] = values[real]
        return out[:, :max_pairs]

    def summed(values, side):  # a value at each side's first token, summed per slot
        side_segments = packed_segments(rows, side, members)[0]
        out = np.zeros((b, max_pairs + 1), np.float32)
        where = side_segments > 0
        side_slot = np.where(where, side_segments - 1, max_pairs)
        np.add.at(out, (row[where], side_slot[where]), values[where])
        return out[:, :max_pairs]

    ids = {name: per_slot(rows[f"chosen_{name}"], 0, np.int64) - 1 for name in PAIR_FEATURES}
    batch = PackedDPOBatch(
        chosen=_side(rows, "chosen", members),
        rejected=_side(rows, "rejected", members),
        ref_chosen_logps=summed(rows["chosen_ref_logp"], "chosen"),
        ref_rejected_logps=summed(rows["rejected_ref_logp"], "rejected"),
        valid=per_slot(np.ones_like(real), False, bool),
        persona_ids=ids["persona"].astype(np.int32),
        stage_ids=ids["stage"].astype(np.int32),
        source_ids=ids["pair_source"].astype(np.int32),
    )
    return batch, np.stack([ids["key_source"], ids["key_index"]], axis=-1)


def packed_pair_logps(
    model, chosen: SFTBatch, rejected: SFTBatch, max_pairs: int, chunk_size: int, dropout_key=None
):
    """Summed answer log-probs and answer lengths of every pair slot, one forward pass over the
    chosen and rejected rows: (chosen_logps [B, P], rejected_logps, chosen_lengths, rejected_lengths)."""
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r]), chosen, rejected)
    rows = both.input_ids.shape[0]
    mask = both.loss_mask.astype(jnp.float32)
    logps = token_logps(model, both, chunk_size, dropout_key) * mask
    bins = max_pairs + 1  # padding in the last
    local = jnp.where(both.segment_ids > 0, both.segment_ids - 1, max_pairs)
    flat = (jnp.arange(rows, dtype=jnp.int32)[:, None] * bins + local).reshape(-1)

    def per_slot(values_BT):
        sums = jax.ops.segment_sum(values_BT.reshape(-1), flat, rows * bins).reshape(rows, bins)
        return sums[:, :max_pairs]

    summed, counts = per_slot(logps), per_slot(mask)
    b = rows // 2
    return summed[:b], summed[b:], counts[:b], counts[b:]
