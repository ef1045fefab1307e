"""Packed rows (several sequences per row, each a segment with its own positions) against one
sequence per row on the same examples: SFT loss and gradients with XLA and splash attention, no
attention across segments, DPO loss, rewards and metrics; and the packer keeps every example whole."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persllm_jax.data import chat_tokenize, pipeline
from persllm_jax.data.chat_tokenize import TokenizedExample
from persllm_jax.model.decoder import CausalLM
from persllm_jax.model.presets import preset
from persllm_jax.train.batches import DPOBatch
from persllm_jax.train.config import DPOSection
from persllm_jax.train.tasks import dpo, dpo_loss, dpo_packing, sft

T, VOCAB = 64, 49152
LOSS_TOL = 1e-5  # fp32: the same sums taken over rows of another shape
GRAD_TOL = 1e-5  # fp32, relative to each leaf's largest gradient entry


def _examples(n: int, seed: int, low: int = 6, high: int = 40) -> list[TokenizedExample]:
    """Random token sequences, trained from a random point on (a prompt, then an answer)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(low, high))
        ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
        start = int(rng.integers(1, length - 2))
        out.append(TokenizedExample(ids, np.arange(length) >= start, f"ex{i}"))
    return out


def _features(example: TokenizedExample, persona: int, stage: int) -> dict:
    return sft.sequence_features(chat_tokenize.to_training_arrays(example, T, 0), persona, stage)


def _rows(features: list[dict], options: pipeline.PipelineOptions, names) -> dict:
    """Every row the pipeline's packer (or padding) makes from `features`, stacked."""
    ds = grain.MapDataset.source(features).to_iter_dataset()
    ds = (
        pipeline.pack(ds, options, names) if options.packing else ds.map(lambda f: pipeline.one_segment(f, T))
    )
    rows = list(ds)
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def _sft_batches(examples):
    features = [_features(e, i % 3, i % 2) for i, e in enumerate(examples)]
    unpacked = sft.batch_from_rows(_rows(features, pipeline.PipelineOptions(T, packing=False), sft.FEATURES))
    packed = sft.batch_from_rows(
        _rows(features, pipeline.PipelineOptions(T, packing=True, packing_bins=4), sft.FEATURES)
    )
    return unpacked, packed


def test_the_packer_keeps_every_example_whole_and_fills_rows():
    examples = _examples(40, 0)
    unpacked, packed = _sft_batches(examples)
    assert packed.input_ids.shape[0] < unpacked.input_ids.shape[0] / 2, "several examples per row"
    found = []
    for row in range(packed.input_ids.shape[0]):
        segments = np.asarray(packed.segment_ids[row])
        for segment in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == segment)
            assert (np.diff(where) == 1).all(), "a segment is contiguous"
            assert np.asarray(packed.positions[row, where]).tolist() == list(range(len(where)))
            found.append(tuple(np.asarray(packed.input_ids[row, where]).tolist()))
    assert sorted(found) == sorted(tuple(e.input_ids.tolist()) for e in examples)
    # 6-39 tokens into rows of 64 with 4 open bins, and the last bins flushed part-filled: 82%
    # here (real persona data, ~200 tokens into 2048, fills rows far better; see the benchmark).
    real = float(np.asarray(packed.attention_mask).mean())
    assert real > 0.75, f"packing efficiency {real:.2f}"


def _loss_and_grads(model: CausalLM, batch, num_groups: int = 3):
    graphdef, params = nnx.split(model)

    def mean_loss(params):
        total, count, sums = sft.sft_loss(
            nnx.merge(graphdef, params), batch, chunk_size=16, num_personas=num_groups, num_stages=2
        )
        return total / count, sums

    (loss, sums), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
    return loss, sums, grads


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_packed_sft_loss_and_gradients_equal_unpacked(impl):
    """The same 24 examples, one per row and packed: loss, per-persona / per-stage sums and every
    gradient agree (splash runs the Pallas kernel in interpret mode here)."""
    unpacked, packed = _sft_batches(_examples(24, 1))
    assert packed.input_ids.shape[0] <= 14, "several examples per row"
    model = CausalLM(preset("tiny", attention_impl=impl, remat="full"), rngs=nnx.Rngs(0))
    loss_u, sums_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, sums_p, grads_p = _loss_and_grads(model, packed)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=LOSS_TOL)
    for key in ("persona_nll", "persona_count", "stage_nll", "stage_count", "tokens", "truncated"):
        np.testing.assert_allclose(
            np.asarray(sums_p[key]), np.asarray(sums_u[key]), rtol=LOSS_TOL, err_msg=key
        )
    assert float(sums_u["persona_count"].min()) > 0, "every persona slice is exercised"
    flat_u = jax.tree_util.tree_flatten_with_path(grads_u)[0]
    flat_p = jax.tree.leaves(grads_p)
    assert len(flat_u) == len(flat_p) > 0
    for (path, g_u), g_p in zip(flat_u, flat_p):
        scale = float(jnp.abs(g_u).max())
        assert scale > 0, path
        np.testing.assert_allclose(
            np.asarray(g_p), np.asarray(g_u), atol=GRAD_TOL * scale, rtol=0, err_msg=str(path)
        )


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_no_token_attends_across_a_segment_boundary(impl):
    """The loss of one segment does not depend on any other segment's tokens: its gradient with
    respect to their input embeddings is exactly zero (and not zero on its own tokens)."""
    _, packed = _sft_batches(_examples(24, 2))
    segments = np.asarray(packed.segment_ids)
    row = int(np.argmax(segments.max(axis=1)))
    assert segments[row].max() >= 3, "a row with three segments"
    model = CausalLM(preset("tiny", attention_impl=impl), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    target = 2  # the middle segment: tokens before and after it in the row
    only_target = packed.replace(loss_mask=packed.loss_mask & (packed.segment_ids == target))

    def target_loss(delta):
        m = nnx.merge(graphdef, params)
        embed = m._embed
        m._embed = lambda ids: embed(ids) + delta
        total, _, _ = sft.sft_loss(m, only_target, chunk_size=16)
        return total

    delta = jnp.zeros((*packed.input_ids.shape, model.cfg.hidden_size), jnp.float32)
    grad = np.asarray(jax.jit(jax.grad(target_loss))(delta))
    own = segments == target
    assert np.abs(grad[own]).max() > 0
    assert np.abs(grad[~own]).max() == 0.0


def _pairs(n: int, seed: int):
    """Preference pairs: a shared random prompt, two random answers, reference log-probs."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        prompt = rng.integers(0, VOCAB, size=int(rng.integers(3, 20)))
        sides = []
        for _ in range(2):
            answer = rng.integers(0, VOCAB, size=int(rng.integers(2, 25)))
            ids = np.concatenate([prompt, answer]).astype(np.int32)
            sides.append(TokenizedExample(ids, np.arange(len(ids)) >= len(prompt), f"pair{i}"))
        arrays = chat_tokenize.pair_training_arrays(f"pair{i}", *sides, T, 0)
        pairs.append((arrays, (float(rng.normal(-80, 5)), float(rng.normal(-85, 5)))))
    return pairs


def _dpo_batches(pairs, max_pairs: int = 16, members: int = 1, row_len: int = T):
    """The pairs one per row, and packed into rows of `row_len` (pairs 2i and 2i + 1 as one unit
    when `members` is 2, as `dpo.mirrors_together` packs a pair and its mirror)."""
    groups = [(i % 3, i % 2) for i in range(len(pairs))]
    flat = [dpo.flat_pair(arrays) for arrays, _ in pairs]
    rows = {name: np.stack([f[name] for f in flat]) for name in flat[0]}
    persona = np.asarray([g[0] for g in groups], np.int32)
    stage = np.asarray([g[1] for g in groups], np.int32)
    unpacked = DPOBatch(
        chosen=dpo.pair_side(rows, "chosen", persona, stage),
        rejected=dpo.pair_side(rows, "rejected", persona, stage),
        ref_chosen_logps=np.asarray([ref[0] for _, ref in pairs], np.float32),
        ref_rejected_logps=np.asarray([ref[1] for _, ref in pairs], np.float32),
    )
    features = [
        dpo_packing.packed_pair_features(arrays, (0, i), *groups[i], ref)
        for i, (arrays, ref) in enumerate(pairs)
    ]
    if members == 2:
        features = [dpo_packing.packed_unit(features[i : i + 2], row_len) for i in range(0, len(features), 2)]
    options = pipeline.PipelineOptions(
        row_len, packing=True, packing_bins=4, max_segments=max_pairs // members
    )
    ds = pipeline.pack(
        grain.MapDataset.source(features).to_iter_dataset(), options, dpo_packing.PACKED_FEATURES
    )
    rows = list(ds)
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    packed, keys = dpo_packing.packed_batch(stacked, max_pairs, members)
    return unpacked, packed, keys


@pytest.mark.parametrize("members", [1, 2], ids=["pairs", "units_of_two"])
def test_packed_dpo_equals_unpacked(members):
    """The same 30 pairs, one per row and packed (chosen and rejected rows in lockstep), alone or
    as units of two (a pair and its mirror): loss, the TRL metrics, per-persona / per-stage
    slices, and each pair's log-probs agree; a unit's two pairs share a row, each its own segment."""
    pairs = _pairs(30, 3)
    unpacked, packed, keys = _dpo_batches(pairs, members=members, row_len=T * members)
    assert packed.valid.shape[0] <= 15 and int(packed.valid.sum()) == 30
    if members == 2:
        slot_rows, slots = np.nonzero(keys[..., 1] >= 0)
        row_of = {int(keys[r, k, 1]): int(r) for r, k in zip(slot_rows, slots)}
        assert all(row_of[i] == row_of[i + 1] for i in range(0, 30, 2)), row_of
        for side in (packed.chosen, packed.rejected):  # each pair its own segment, positions from 0
            segments, positions = np.asarray(side.segment_ids), np.asarray(side.positions)
            for r in range(segments.shape[0]):
                for segment in set(segments[r].tolist()) - {0}:
                    where = segments[r] == segment
                    np.testing.assert_array_equal(positions[r][where], np.arange(where.sum()))
    assert sorted(int(i) for i in keys[..., 1][keys[..., 1] >= 0]) == list(range(30)), "every pair once"
    model = CausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    # with the SFT term (a token mean over the batch's chosen answers): empty slots add nothing
    settings = DPOSection(beta=0.2, loss_type="sigmoid", label_smoothing=0.1, sft_weight=0.5)

    def run(batch):
        return dpo_loss.dpo_batch_loss(
            model, batch, None, dpo=settings, chunk_size=16, num_personas=3, num_stages=2
        )

    total_u, count_u, sums_u = jax.jit(run)(unpacked)
    total_p, count_p, sums_p = jax.jit(run)(packed)
    assert float(count_u) == float(count_p) == 30
    np.testing.assert_allclose(float(total_p), float(total_u), rtol=LOSS_TOL)
    for key, value in sums_u.items():
        np.testing.assert_allclose(
            np.asarray(sums_p[key]), np.asarray(value), rtol=LOSS_TOL, atol=1e-6, err_msg=key
        )
    assert float(sums_u["persona_count"].min()) > 0
    assert float(sums_u["nll_loss"]) > 0

    chosen_u, rejected_u, _, _ = dpo_loss.pair_logps(model, unpacked.chosen, unpacked.rejected, 16)
    chosen_p, rejected_p, _, _ = dpo_packing.packed_pair_logps(model, packed.chosen, packed.rejected, 16, 16)
    valid = np.asarray(packed.valid)
    index = keys[..., 1][valid]
    np.testing.assert_allclose(np.asarray(chosen_p)[valid], np.asarray(chosen_u)[index], rtol=LOSS_TOL)
    np.testing.assert_allclose(np.asarray(rejected_p)[valid], np.asarray(rejected_u)[index], rtol=LOSS_TOL)


def test_packed_dpo_with_the_policy_as_reference_is_log2():
    pairs = _pairs(12, 4)
    _, packed, _ = _dpo_batches(pairs)
    model = CausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    total, count, sums = dpo_loss.dpo_batch_loss(model, packed, model, dpo=DPOSection(), chunk_size=16)
    assert float(count) == 12
    np.testing.assert_allclose(float(total) / float(count), np.log(2), rtol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(sums[key]) == 0.0, key


def test_a_unit_longer_than_a_row_is_an_error_naming_its_pairs():
    features = [
        dpo_packing.packed_pair_features(arrays, (0, i), 0, 0, ref)
        for i, (arrays, ref) in enumerate(_pairs(2, 5))
    ]
    both = max(sum(len(f[f"{side}_input_ids"]) for f in features) for side in ("chosen", "rejected"))
    assert max(len(v) for v in dpo_packing.packed_unit(features, both).values()) == both
    with pytest.raises(
        ValueError, match=r"pairs \[\(0, 0\), \(0, 1\)\] .* (chosen|rejected) sides take \d+ tokens"
    ):
        dpo_packing.packed_unit(features, both - 1)
