"""Stage 2 of PersLLM: DPO on automatically mined persona / stage preference pairs.

The reference model's log-probs are computed once, before training, in a sharded pass over all
pairs, and cached on disk (`reference_cache.py`): DPO then holds one model in memory, and a
restart reads the cache instead of recomputing. `dpo.reference: frozen` keeps a second, frozen copy of the weights and computes the
reference inside the step instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from persllm_jax import losses
from persllm_jax.data import chat_tokenize, formats
from persllm_jax.train.batches import DPOBatch, SFTBatch
from persllm_jax.train.config import DPOSection, RunConfig
from persllm_jax.train.tasks import common, sft
from persllm_jax.train.tasks.reference_cache import ReferenceCache, gather, tokenizer_fingerprint
from persllm_jax.train.tasks.sft import pad_id, sequence_nll, stack_rows
from persllm_jax.train.tasks.token_cache import TokenCache

log = logging.getLogger(__name__)

REFERENCE_TYPES = ("cached", "frozen")
# How a pair longer than seq_len is cut (part of the reference cache's key: another rule gives
# other log-probs). See data/chat_tokenize.py.
TRUNCATION_RULE = "keep the first seq_len tokens of each side"


def pair_arrays(tokenizer, example, seq_len: int) -> dict[str, np.ndarray]:
    pair = chat_tokenize.tokenize_preference(tokenizer, example, seq_len, pad_id=pad_id(tokenizer))
    return flat_pair(pair)


def flat_pair(pair: chat_tokenize.TokenizedPair) -> dict[str, np.ndarray]:
    """`chosen_input_ids`, ..., `rejected_length`: a pair's arrays as one row."""
    return {
        f"{side}_{name}": value
        for side, arrays in (("chosen", pair.chosen), ("rejected", pair.rejected))
        for name, value in arrays._asdict().items()
    }


def pair_side(rows: dict, side: str, persona_ids, stage_ids) -> SFTBatch:
    return SFTBatch(
        input_ids=rows[f"{side}_input_ids"],
        targets=rows[f"{side}_targets"],
        loss_mask=rows[f"{side}_loss_mask"],
        attention_mask=rows[f"{side}_attention_mask"],
        persona_ids=persona_ids,
        stage_ids=stage_ids,
        length=rows[f"{side}_length"],
    )


def pair_logps(model, chosen: SFTBatch, rejected: SFTBatch, chunk_size: int):
    """Summed answer log-probs and answer lengths, chosen and rejected in one forward pass:
    (chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B])."""
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r]), chosen, rejected)
    nll, count = sequence_nll(model, both, chunk_size)
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
    batch: DPOBatch,
    reference,
    *,
    dpo: DPOSection,
    chunk_size: int,
    num_personas: int = 0,
    num_stages: int = 0,
):
    """(summed per-pair losses, number of pairs, metric sums incl. per-persona/stage slices).
    `reference` is a frozen model, or None to use the cached log-probs carried by the batch."""
    policy_c, policy_r, len_c, len_r = pair_logps(model, batch.chosen, batch.rejected, chunk_size)
    if reference is not None:
        ref_c, ref_r, _, _ = jax.lax.stop_gradient(
            pair_logps(reference, batch.chosen, batch.rejected, chunk_size)
        )
    else:
        ref_c, ref_r = batch.ref_chosen_logps, batch.ref_rejected_logps
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
    tokens = batch.chosen.attention_mask.sum() + batch.rejected.attention_mask.sum()
    seq_len = batch.chosen.input_ids.shape[1]
    cut_B = (batch.chosen.length > seq_len) | (batch.rejected.length > seq_len)
    sums = {
        "tokens": tokens.astype(jnp.float32),
        "truncated": cut_B.sum().astype(jnp.float32),
        **metric_sums(chosen_B, rejected_B, policy_c, policy_r),
    }
    correct_B = (chosen_B > rejected_B).astype(jnp.float32)
    margin_B, ones = chosen_B - rejected_B, jnp.ones_like(loss_B)
    for kind, ids, count in (
        ("persona", batch.chosen.persona_ids, num_personas),
        ("stage", batch.chosen.stage_ids, num_stages),
    ):
        sums[f"{kind}_count"] = common.segment_sums(ones, ids, count)
        sums[f"{kind}_accuracies"] = common.segment_sums(correct_B, ids, count)
        sums[f"{kind}_margins"] = common.segment_sums(margin_B, ids, count)
        sums[f"{kind}_loss"] = common.segment_sums(jax.lax.stop_gradient(loss_B), ids, count)
    return loss_B.sum(), jnp.asarray(loss_B.shape[0], jnp.float32), sums


def check_settings(cfg: RunConfig) -> None:
    """An unknown `dpo.reference` or `dpo.loss_type` is an error naming the valid ones, before any work."""
    if cfg.dpo.reference not in REFERENCE_TYPES:
        raise ValueError(f"dpo.reference={cfg.dpo.reference!r}; valid: {', '.join(REFERENCE_TYPES)}")
    zero = jnp.zeros((1,))
    losses.dpo_loss(zero, zero, zero, zero, loss_type=cfg.dpo.loss_type)


def batch_shardings(mesh) -> DPOBatch:
    sharding = common.batch_sharding(mesh)
    side = sft.batch_shardings(mesh)
    return DPOBatch(chosen=side, rejected=side, ref_chosen_logps=sharding, ref_rejected_logps=sharding)


def abstract_batch(cfg: RunConfig, shardings: DPOBatch) -> DPOBatch:
    """The shapes and dtypes of a global batch of pairs (what `DPOTask.global_batch` returns)."""
    pairs = cfg.train.batch_size
    return DPOBatch(
        chosen=sft.abstract_batch(cfg, shardings.chosen),
        rejected=sft.abstract_batch(cfg, shardings.rejected),
        ref_chosen_logps=jax.ShapeDtypeStruct((pairs,), jnp.float32, sharding=shardings.ref_chosen_logps),
        ref_rejected_logps=jax.ShapeDtypeStruct((pairs,), jnp.float32, sharding=shardings.ref_rejected_logps),
    )


def make_loss_fn(cfg: RunConfig, graphdef, num_personas: int, num_stages: int):
    """The DPO loss of the train step; `frozen` is the reference's parameters, or None when the
    batch carries cached reference log-probs."""

    def loss_fn(model, batch: DPOBatch, frozen):
        reference = None if frozen is None else nnx.merge(graphdef, frozen)
        return dpo_batch_loss(
            model,
            batch,
            reference,
            dpo=cfg.dpo,
            chunk_size=cfg.train.logits_chunk,
            num_personas=num_personas,
            num_stages=num_stages,
        )

    return loss_fn


class DPOTask:
    name = "dpo"

    def __init__(
        self,
        *,
        cfg: RunConfig,
        tokenizer,
        model_cfg,
        graphdef,
        mesh,
        run_dir: Path,
        initial_params,
        params_shardings,
        **_,
    ):
        check_settings(cfg)
        self.cfg, self.tokenizer, self.graphdef, self.mesh = cfg, tokenizer, graphdef, mesh
        self.model_cfg = model_cfg
        self.data = common.TaskData(cfg, formats.preference_example, mesh)
        self.examples, self.groups = self.data.examples, self.data.groups
        self.batch_shardings = batch_shardings(mesh)
        self.loss_fn = make_loss_fn(cfg, graphdef, len(self.groups.personas), len(self.groups.stages))
        self._tokens = TokenCache(lambda example: chat_tokenize.tokenize_pair_sides(tokenizer, example))
        self.longest_seen = 0  # tokens of the longest side this host has loaded, before cutting
        if cfg.dpo.reference == "frozen":
            self.frozen = initial_params() if callable(initial_params) else initial_params
            self.frozen_shardings = params_shardings
            self.reference = None
        else:
            self.frozen, self.frozen_shardings = None, None
            cache = ReferenceCache(
                run_dir / "reference_logps", self.data.fingerprint, len(self.examples), self._logp_settings()
            )
            m = cfg.model
            source = {
                "path": m.path,
                "preset": m.preset,
                "seed": m.seed,
                "tokens": m.add_tokens,
                "dtype": m.dtype,
            }
            self.reference = cache.load_or_compute(initial_params, self._compute_reference, source)

    def _logp_settings(self) -> dict:
        """What, besides the data and the weights, changes a reference log-prob."""
        return {
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "seq_len": self.cfg.train.seq_len,
            "truncation": TRUNCATION_RULE,
            "compute_dtype": self.model_cfg.compute_dtype,
            "attention": self.model_cfg.attention_impl,
            "logits_chunk": self.cfg.train.logits_chunk,
        }

    # -- data ------------------------------------------------------------------------------

    def _rows(self, picked):
        seq_len, pad = self.cfg.train.seq_len, pad_id(self.tokenizer)
        pairs = []
        for key, example in picked:
            chosen, rejected = self._tokens.get(key, example)
            pairs.append(
                flat_pair(chat_tokenize.pair_training_arrays(example.id, chosen, rejected, seq_len, pad))
            )
        return stack_rows(pairs)

    def host_batch(self, step: int) -> DPOBatch:
        picked = self.data.local_picks(step)
        keys = [key for key, _ in picked]
        rows = self._rows(picked)
        ids = self.data.group_ids(picked)
        self.longest_seen = max(
            self.longest_seen, int(rows["chosen_length"].max()), int(rows["rejected_length"].max())
        )
        if self.reference is not None:
            ref_c = np.asarray([self.reference["chosen"][s][i] for s, i in keys], np.float32)
            ref_r = np.asarray([self.reference["rejected"][s][i] for s, i in keys], np.float32)
        else:
            ref_c = ref_r = np.zeros(len(keys), np.float32)
        return DPOBatch(
            chosen=pair_side(rows, "chosen", ids[:, 0], ids[:, 1]),
            rejected=pair_side(rows, "rejected", ids[:, 0], ids[:, 1]),
            ref_chosen_logps=ref_c,
            ref_rejected_logps=ref_r,
        )

    def global_batch(self, step: int) -> DPOBatch:
        return common.to_global(
            self.host_batch(step),
            self.batch_shardings.ref_chosen_logps,
            self.data.rows,
            self.cfg.train.batch_size,
        )

    # -- the reference pass ----------------------------------------------------------------

    def _compute_reference(self, params) -> dict:
        """One sharded forward pass over every pair, in the micro-batch shape of the train step
        (chosen and rejected concatenated, as in `loss_fn`), so that at step 0 the policy's
        log-probs reproduce the reference's."""
        batch_size = self.cfg.train.batch_size // self.cfg.train.grad_accum_steps
        chunk, graphdef = self.cfg.train.logits_chunk, self.graphdef

        @jax.jit
        def reference_logps(params, chosen: SFTBatch, rejected: SFTBatch):
            return pair_logps(nnx.merge(graphdef, params), chosen, rejected, chunk)[:2]

        keys = [(s, i) for s, source in enumerate(self.examples) for i in range(len(source))]
        out = {
            side: [np.zeros(len(source), np.float32) for source in self.examples]
            for side in ("chosen", "rejected")
        }
        sharding = self.batch_shardings.ref_chosen_logps
        held = common.process_rows(sharding, batch_size)
        for start in tqdm(
            range(0, len(keys), batch_size), desc="reference log-probs", disable=jax.process_index() != 0
        ):
            chunk_keys = keys[start : start + batch_size]
            padded = chunk_keys + [chunk_keys[0]] * (batch_size - len(chunk_keys))
            local = [padded[row] for row in held]
            rows = self._rows([(k, self.examples[k[0]][k[1]]) for k in local])
            ids = np.full(len(local), -1, np.int32)
            sides = [
                common.to_global(pair_side(rows, side, ids, ids), sharding, held, batch_size)
                for side in ("chosen", "rejected")
            ]
            for side, values in zip(("chosen", "rejected"), reference_logps(params, *sides)):
                for (s, i), value in zip(chunk_keys, gather(values)[: len(chunk_keys)]):
                    out[side][s][i] = value
        return out

    # -- the loss ----------------------------------------------------------------------------

    def metrics_record(self, values: dict) -> dict:
        pairs = float(values["count"])
        record = {k: float(values[k]) for k in ("loss", "grad_norm", "learning_rate", "tokens", "truncated")}
        for key in DPO_METRICS:
            record[key] = float(values[key]) / pairs
        for kind, names in (("persona", self.groups.personas), ("stage", self.groups.stages)):
            for metric in ("accuracies", "margins"):
                record.update(
                    common.sliced_means(
                        f"rewards/{metric}", values[f"{kind}_{metric}"], values[f"{kind}_count"], names, kind
                    )
                )
            record.update(
                common.sliced_means("loss", values[f"{kind}_loss"], values[f"{kind}_count"], names, kind)
            )
        return record

    def data_position(self, step: int) -> dict:
        return self.data.position(step)

    def check_resume(self, saved: dict) -> None:
        self.data.check_resume(saved)
