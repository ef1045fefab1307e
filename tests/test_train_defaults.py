"""The settings users run most, each against an independent computation on the tiny model:
remat (full, dots) against none, gradient accumulation against one large batch, bf16 compute
against fp32, and every DPO loss type through the trainer's loss against `dpo_loss` applied to
log-probs computed separately."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persllm_jax import losses
from persllm_jax.model.decoder import CausalLM
from persllm_jax.model.presets import preset
from persllm_jax.train.batches import DPOBatch, SFTBatch
from persllm_jax.train.config import DPOSection, OptimSection, RunConfig, TrainSection
from persllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from persllm_jax.train.state import init_state
from persllm_jax.train.step import make_train_step
from persllm_jax.train.tasks import dpo
from persllm_jax.train.tasks.sft import sft_loss

B, T, VOCAB = 8, 32, 49152


def _batch(seed: int, rows: int = B) -> SFTBatch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(rows, T), dtype=np.int32)
    lengths = rng.integers(T // 2, T + 1, size=rows)
    real = np.arange(T)[None] < lengths[:, None]
    trained = real & (np.arange(T)[None] >= T // 4) & (np.arange(T)[None] < lengths[:, None] - 1)
    return SFTBatch(
        input_ids=jnp.asarray(ids), targets=jnp.asarray(np.roll(ids, -1, axis=1)), loss_mask=jnp.asarray(trained),
        attention_mask=jnp.asarray(real), persona_ids=jnp.full((rows,), -1, jnp.int32),
        stage_ids=jnp.full((rows,), -1, jnp.int32), length=jnp.asarray(lengths, jnp.int32),
    )  # fmt: skip


def _model(**options) -> CausalLM:
    return CausalLM(preset("tiny", **options), rngs=nnx.Rngs(0))


def _loss_and_grads(model: CausalLM, batch: SFTBatch):
    graphdef, params = nnx.split(model)

    def mean_loss(params):
        total, count, _ = sft_loss(nnx.merge(graphdef, params), batch, chunk_size=16)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_loss_and_gradients_of_none(remat):
    batch = _batch(0)
    loss, grads = _loss_and_grads(_model(remat="none"), batch)
    loss_r, grads_r = _loss_and_grads(_model(remat=remat), batch)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-5)
    for (path, g), g_r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_r)):
        scale = float(jnp.abs(g).max())
        np.testing.assert_allclose(
            np.asarray(g_r), np.asarray(g), atol=1e-5 * scale, rtol=0, err_msg=str(path)
        )


def _one_step(accum: int, batch: SFTBatch, compute_dtype: str = "float32", steps: int = 1):
    model = _model(remat="full", compute_dtype=compute_dtype)
    graphdef, params = nnx.split(model)
    optim = OptimSection(lr=1e-3, warmup_steps=0)
    optimizer, schedule = make_optimizer(optim, 10), learning_rate_schedule(optim, 10)

    def loss_fn(model, batch, frozen):
        return sft_loss(model, batch, chunk_size=16)

    step = jax.jit(make_train_step(graphdef, loss_fn, optimizer, schedule, grad_accum_steps=accum))
    state, history = init_state(params, optimizer), []
    for i in range(steps):
        state, metrics = step(state, batch if steps == 1 else _batch(10 + i))
        history.append(float(metrics["loss"]))
    return state, history


def test_gradient_accumulation_equals_one_large_batch():
    """4 micro-batches of 2 rows make the same update as the 8 rows at once: the summed loss is
    divided by the trained tokens of the whole batch, not averaged per micro-batch."""
    batch = _batch(1)
    assert len(set(np.asarray(batch.loss_mask).sum(1).tolist())) > 1, "rows train different token counts"
    one, _ = _one_step(1, batch)
    four, _ = _one_step(4, batch)
    flat_one = jax.tree_util.tree_flatten_with_path(one.opt_state)[0]
    flat_four = jax.tree.leaves(four.opt_state)
    assert len(flat_one) == len(flat_four) > 0
    # AdamW's first moment is linear in the gradient and the second quadratic. The two runs sum the
    # same fp32 terms in a different order (four partial sums, then their sum), which moves the
    # largest moments by up to ~100 ulps (relative 1.5e-6 seen on AVX-512 machines), so the bound is
    # 1e-5 of each leaf's largest value. Averaging per micro-batch instead would move the moments by
    # percents (the rows train between 10 and 22 tokens), three orders of magnitude above the bound.
    for (path, a), b in zip(flat_one, flat_four):
        scale = float(jnp.abs(a).max()) if a.size else 0.0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=0, err_msg=str(path))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_bf16_compute_tracks_fp32():
    """4 steps with bf16 matmuls (fp32 weights, norms and logits): each loss within 1% of fp32."""
    _, fp32 = _one_step(1, None, "float32", steps=4)
    _, bf16 = _one_step(1, None, "bfloat16", steps=4)
    np.testing.assert_allclose(bf16, fp32, rtol=1e-2)
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_every_dpo_loss_type_through_the_trainers_loss(loss_type):
    model = _model()
    graphdef, params = nnx.split(model)
    chosen, rejected = _batch(2), _batch(3)
    rng = np.random.default_rng(4)
    ref_c, ref_r = (jnp.asarray(rng.normal(-120, 5, size=B), jnp.float32) for _ in range(2))
    batch = DPOBatch(chosen=chosen, rejected=rejected, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    cfg = RunConfig(
        train=TrainSection(logits_chunk=16),
        dpo=DPOSection(beta=0.2, loss_type=loss_type, label_smoothing=smoothing),
    )
    total, count, _ = dpo.make_loss_fn(cfg, graphdef, 0, 0)(nnx.merge(graphdef, params), batch, None)

    # independently: summed answer log-probs per sequence, then the loss formula
    def answer_logps(side: SFTBatch):
        hidden = model.hidden_states(side.input_ids, side.attention_mask)
        logits = jnp.einsum(
            "btd,dv->btv", hidden.astype(jnp.float32), model.output_kernel().astype(jnp.float32)
        )
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, side.targets[..., None], axis=-1)[..., 0]
        return (picked * side.loss_mask).sum(-1), side.loss_mask.sum(-1).astype(jnp.float32)

    (pc, nc), (pr, nr) = answer_logps(chosen), answer_logps(rejected)
    if loss_type == "ipo":  # IPO compares length-normalized log-ratios
        pc, pr, rc, rr = pc / nc, pr / nr, ref_c / nc, ref_r / nr
    else:
        rc, rr = ref_c, ref_r
    expected, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=smoothing)
    assert float(count) == B
    np.testing.assert_allclose(float(total) / B, float(expected.mean()), rtol=1e-5)


def _answer_logps(model: CausalLM, side: SFTBatch):
    """Each row's summed answer log-prob and its answer token count, from the full logits."""
    hidden = model.hidden_states(side.input_ids, side.attention_mask)
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), model.output_kernel().astype(jnp.float32))
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), side.targets[..., None], axis=-1)[
        ..., 0
    ]
    return (picked * side.loss_mask).sum(-1), side.loss_mask.sum(-1).astype(jnp.float32)


def test_dpo_sft_term_under_gradient_accumulation_is_a_token_mean_per_micro_batch():
    """`dpo.sft_weight` with 2 micro-batches: the step's loss is the pairs' mean DPO loss plus, for
    each micro-batch, the weight times its chosen answers' NLL per token, weighted by its pairs
    (each micro-batch's own token mean, as the README says), against a formula computed here from
    separately computed log-probs. A token mean over the whole batch gives another loss: the
    micro-batches train different numbers of tokens at different NLLs."""
    model = _model()
    # sharper logits than a fresh init's near-uniform ones, so that rows' NLLs per token differ
    if model.lm_head is not None:
        model.lm_head[...] = model.lm_head[...] * 40
    else:
        model.embed[...] = model.embed[...] * 40
    graphdef, params = nnx.split(model)
    chosen, rejected = _batch(2), _batch(3)
    rng = np.random.default_rng(4)
    ref_c, ref_r = (jnp.asarray(rng.normal(-120, 5, size=B), jnp.float32) for _ in range(2))
    batch = DPOBatch(chosen=chosen, rejected=rejected, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    weight, accum = 0.5, 2
    cfg = RunConfig(train=TrainSection(logits_chunk=16), dpo=DPOSection(beta=0.2, sft_weight=weight))
    optimizer, schedule = (
        make_optimizer(OptimSection(lr=1e-3), 10),
        learning_rate_schedule(OptimSection(lr=1e-3), 10),
    )
    step = jax.jit(
        make_train_step(graphdef, dpo.make_loss_fn(cfg, graphdef, 0, 0), optimizer, schedule, accum)
    )
    _, metrics = step(init_state(params, optimizer), batch)

    (pc, nc), (pr, _) = _answer_logps(model, chosen), _answer_logps(model, rejected)
    pairs, _, _ = losses.dpo_loss(pc, pr, ref_c, ref_r, beta=0.2, loss_type="sigmoid")
    micro = [np.arange(B)[m::accum] for m in range(accum)]  # the step's split: every accum-th row
    nll = [float(-pc[rows].sum() / nc[rows].sum()) for rows in micro]
    assert abs(nll[0] - nll[1]) > 1e-3 * nll[0], "the micro-batches' NLLs must differ for the check to bite"
    expected = float(pairs.mean()) + weight * sum(n * len(rows) for n, rows in zip(nll, micro)) / B
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    # the step returns sums; the logged nll_loss is their mean over pairs
    logged = float(metrics["nll_loss"]) / float(metrics["count"])
    np.testing.assert_allclose(logged, sum(n * len(r) for n, r in zip(nll, micro)) / B, rtol=1e-5)
    whole = float(pairs.mean()) + weight * float(-pc.sum() / nc.sum())
    # 3e-4 apart here: 30 times the tolerance above
    assert abs(whole - expected) > 1e-4 * expected, "a whole-batch token mean would pass as well"
