"""Stage 2 of PersLLM: DPO on automatically mined persona / stage preference pairs.

The reference model's log-probs are computed once, before training, in a sharded pass over all
pairs, and cached on disk (`reference_cache.py`): DPO then holds one model in memory, and a
restart reads the cache instead of recomputing. `dpo.reference: frozen` keeps a second, frozen copy of the weights and computes the
reference inside the step instead; `dpo.reference: base` (LoRA runs) computes it in the step from the
policy's own weights with the adapters off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax import losses
from persllm_jax.data import chat_tokenize, formats, pipeline
from persllm_jax.model.lora import adapters_off
from persllm_jax.train.batches import DPOBatch, PackedDPOBatch, SFTBatch
from persllm_jax.train.config import RunConfig
from persllm_jax.train.tasks import common, reference_pass, sft
from persllm_jax.train.tasks.dpo_loss import (
    DPO_METRICS,
    dpo_batch_loss,
    pair_logps,
)
from persllm_jax.train.tasks.dpo_packing import (
    PACKED_FEATURES,
    packed_batch,
    packed_pair_features,
    packed_pair_logps,
    packed_unit,
)
from persllm_jax.train.tasks.on_policy import with_on_policy_pairs
from persllm_jax.train.tasks.reference_cache import SIDES, ReferenceCache, tokenizer_fingerprint
from persllm_jax.train.tasks.sft import pad_id
from persllm_jax.train.tasks.token_cache import TokenCache

log = logging.getLogger(__name__)

REFERENCE_TYPES = ("cached", "frozen", "base")
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
    mask = rows[f"{side}_attention_mask"]
    return SFTBatch(
        input_ids=rows[f"{side}_input_ids"],
        targets=rows[f"{side}_targets"],
        loss_mask=rows[f"{side}_loss_mask"],
        attention_mask=mask,
        persona_ids=persona_ids,
        stage_ids=stage_ids,
        length=rows[f"{side}_length"],
        segment_ids=np.asarray(mask, np.int32),
        positions=np.broadcast_to(np.arange(mask.shape[-1], dtype=np.int32), mask.shape),
    )


def check_settings(cfg: RunConfig) -> None:
    """An unknown `dpo.reference` or `dpo.loss_type` is an error naming the valid ones, before any work."""
    if cfg.dpo.reference not in REFERENCE_TYPES:
        raise ValueError(f"dpo.reference={cfg.dpo.reference!r}; valid: {', '.join(REFERENCE_TYPES)}")
    if cfg.dpo.reference == "base" and not cfg.lora.rank:
        raise ValueError(
            "dpo.reference=base needs LoRA adapters (lora.rank > 0): the base is the adapters-off policy"
        )
    if cfg.dpo.mirrors_together and not (cfg.train.packing and cfg.train.max_segments >= 2):
        raise ValueError(
            "dpo.mirrors_together needs packed DPO with room for two pairs in a row (train.packing=true, "
            f"train.max_segments >= 2; got {cfg.train.packing}, {cfg.train.max_segments}): a pair and "
            "its mirror are packed into one row"
        )
    if not cfg.dpo.sft_weight >= 0:
        raise ValueError(f"dpo.sft_weight={cfg.dpo.sft_weight}; it weighs a loss and must be >= 0")
    zero = jnp.zeros((1,))
    losses.dpo_loss(zero, zero, zero, zero, loss_type=cfg.dpo.loss_type)


def _text(messages) -> str:
    return messages if isinstance(messages, str) else json.dumps(list(messages), sort_keys=True)


def mirror_key(example) -> tuple[tuple[str, str, str], int]:
    """(what a pair shares with its mirror, which of the two it is): the prompt without its
    system messages and the two answers, in a fixed order; side 0 prefers the first answer, side 1
    (the mirror) the second."""
    prompt = example.prompt_messages
    if not isinstance(prompt, str):
        prompt = [m for m in prompt if m.get("role") != "system"]
    chosen, rejected = _text(example.chosen_messages), _text(example.rejected_messages)
    first, second = sorted((chosen, rejected))
    return (_text(prompt), first, second), int(chosen != first)


def batch_shardings(mesh, packed: bool = False) -> DPOBatch | PackedDPOBatch:
    sharding = common.batch_sharding(mesh)
    side = sft.batch_shardings(mesh)
    if packed:
        return PackedDPOBatch(side, side, *([sharding] * 6))
    return DPOBatch(
        chosen=side,
        rejected=side,
        ref_chosen_logps=sharding,
        ref_rejected_logps=sharding,
        source_ids=sharding,
    )


def abstract_batch(cfg: RunConfig, shardings: DPOBatch | PackedDPOBatch) -> DPOBatch | PackedDPOBatch:
    """The shapes and dtypes of a global batch of pairs (what `DPOTask.global_batch` returns)."""
    rows = cfg.train.batch_size
    if isinstance(shardings, PackedDPOBatch):
        slots = (rows, cfg.train.max_segments)
        dtypes = (jnp.float32, jnp.float32, bool, jnp.int32, jnp.int32, jnp.int32)
        names = ("ref_chosen_logps", "ref_rejected_logps", "valid", "persona_ids", "stage_ids", "source_ids")
        return PackedDPOBatch(
            chosen=sft.abstract_batch(cfg, shardings.chosen),
            rejected=sft.abstract_batch(cfg, shardings.rejected),
            **{
                name: jax.ShapeDtypeStruct(slots, dtype, sharding=getattr(shardings, name))
                for name, dtype in zip(names, dtypes)
            },
        )
    return DPOBatch(
        chosen=sft.abstract_batch(cfg, shardings.chosen),
        rejected=sft.abstract_batch(cfg, shardings.rejected),
        ref_chosen_logps=jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=shardings.ref_chosen_logps),
        ref_rejected_logps=jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=shardings.ref_rejected_logps),
        source_ids=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=shardings.source_ids),
    )


def make_loss_fn(cfg: RunConfig, graphdef, num_personas: int, num_stages: int, num_sources: int = 0):
    """The DPO loss of the train step; `frozen` is the reference's parameters, or None when the
    batch carries cached reference log-probs."""

    def loss_fn(model, batch: DPOBatch, frozen, dropout_key=None):
        if cfg.dpo.reference == "base":  # the same weights with the adapters off: no second copy
            reference = nnx.merge(graphdef, adapters_off(nnx.state(model)))
        else:
            reference = None if frozen is None else nnx.merge(graphdef, frozen)
        return dpo_batch_loss(
            model,
            batch,
            reference,
            dpo=cfg.dpo,
            chunk_size=cfg.train.logits_chunk,
            num_personas=num_personas,
            num_stages=num_stages,
            num_sources=num_sources,
            dropout_key=dropout_key,
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
        sample_pairs=None,  # builder/on_policy.py's, for `dpo.on_policy`
        **_,
    ):
        check_settings(cfg)
        cfg = with_on_policy_pairs(cfg, run_dir, tokenizer, graphdef, initial_params, sample_pairs)
        self.cfg, self.tokenizer, self.graphdef, self.mesh = cfg, tokenizer, graphdef, mesh
        self.model_cfg = model_cfg
        self.packed, self.max_pairs = cfg.train.packing, cfg.train.max_segments
        self.pair_key = mirror_key if cfg.dpo.mirrors_together else None
        self.members = 2 if cfg.dpo.mirrors_together else 1  # pairs in one packed unit, at most
        self.data = common.TaskData(cfg, formats.preference_example, mesh, pair_key=self.pair_key)
        self.examples, self.groups = self.data.examples, self.data.groups
        self.batch_shardings = batch_shardings(mesh, self.packed)
        g = self.groups
        self.loss_fn = make_loss_fn(cfg, graphdef, len(g.personas), len(g.stages), len(g.pair_sources))
        self._tokens = TokenCache(lambda example: chat_tokenize.tokenize_pair_sides(tokenizer, example))
        self._eval_tokens = TokenCache(lambda example: chat_tokenize.tokenize_pair_sides(tokenizer, example))
        if self.members > 1:
            self._check_units(self.data, self._tokens)
        self.longest_seen = 0  # tokens of the longest side this host has loaded, before cutting
        self.reference = None  # {(source, index): (chosen, rejected)} of this process's pairs
        if cfg.dpo.reference == "frozen":
            self.frozen = initial_params() if callable(initial_params) else initial_params
            self.frozen_shardings = params_shardings
        elif cfg.dpo.reference == "base":
            self.frozen, self.frozen_shardings = None, None
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
            self.reference = self._local_reference(
                cache.load_or_compute(
                    initial_params, lambda p: self._compute_reference(p, self.data), source
                ),
                self.data,
            )
        self.rows = self.data.host_rows(
            self._features, self._names, self._options(), self._pad, self._combine
        )
        self.eval_data, self.eval_reference = None, None
        if cfg.eval.every_steps > 0:
            self.eval_data = common.TaskData(
                cfg, formats.preference_example, mesh, held_out=True, pair_key=self.pair_key
            )
            if self.members > 1:
                self._check_units(self.eval_data, self._eval_tokens)
            if cfg.dpo.reference == "cached":
                cache = ReferenceCache(
                    run_dir / "reference_logps" / "held_out",
                    self.eval_data.fingerprint,
                    len(self.eval_data.examples),
                    self._logp_settings(),
                )
                computed = cache.load_or_compute(
                    initial_params, lambda p: self._compute_reference(p, self.eval_data), source
                )
                self.eval_reference = self._local_reference(computed, self.eval_data)

    def _logp_settings(self) -> dict:
        """What, besides the data and the weights, changes a reference log-prob."""
        return {
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "seq_len": self.cfg.train.seq_len,
            "truncation": TRUNCATION_RULE,
            "compute_dtype": self.model_cfg.compute_dtype,
            "attention": self.model_cfg.attention_impl,
            "logits_chunk": self.cfg.train.logits_chunk,
            "packing": self.packed,
            "mirrors_together": self.cfg.dpo.mirrors_together,
        }

    # -- data ------------------------------------------------------------------------------

    @property
    def _names(self):
        return PACKED_FEATURES if self.packed else ()

    def _options(self):
        options = common.pipeline_options(self.cfg, self.cfg.train.seq_len)
        # a unit of M pairs takes M pair slots of the row
        return dataclasses.replace(options, max_segments=self.max_pairs // self.members)

    def _check_units(self, data: common.TaskData, tokens) -> None:
        """Every unit of this process's rows fits a row (before any step: a unit is first packed
        when a row stream reaches it)."""
        units = [
            shard.unit(source, index)
            for shard in data.shards.values()
            for source in range(len(shard.examples))
            for index in range(len(shard.source_units(source)))
        ]
        units = [unit for unit in units if len(unit) > 1]
        for unit in units:
            self._combine([self._pair_features(key, example, None, tokens) for key, example in unit])
        log.info("DPO data: %d pairs train with their mirrors (this process's rows)", 2 * len(units))

    def _combine(self, pairs: list[dict]) -> dict:
        return packed_unit(pairs, self.cfg.train.seq_len)

    @staticmethod
    def _pad(features, row_len):
        return features  # unpacked pairs are padded by `pair_training_arrays`

    def _features(self, key, example) -> dict[str, np.ndarray]:
        return self._pair_features(key, example, self.reference, self._tokens)

    def _pair_features(self, key, example, reference, tokens) -> dict[str, np.ndarray]:
        """A pair's pipeline features; `reference` maps its key to the cached reference log-probs
        (None: no cache, zeros); `tokens` is the token cache of the data it belongs to."""
        seq_len, pad = self.cfg.train.seq_len, pad_id(self.tokenizer)
        chosen, rejected = tokens.get(key, example)
        pair = chat_tokenize.pair_training_arrays(example.id, chosen, rejected, seq_len, pad)
        persona, stage = self.groups.ids(example)
        source = self.groups.source_id(example)
        ref = None if reference is None else reference.get(tuple(key))
        if self.packed:
            return packed_pair_features(pair, key, persona, stage, ref, source)
        ref = (0.0, 0.0) if ref is None else ref
        return {
            **flat_pair(pair),
            "persona": np.int32(persona),
            "stage": np.int32(stage),
            "pair_source": np.int32(source),
            "ref_chosen": np.float32(ref[0]),
            "ref_rejected": np.float32(ref[1]),
            "key_source": np.int64(key[0]),
            "key_index": np.int64(key[1]),
        }

    def _batch(self, rows: dict) -> tuple[DPOBatch | PackedDPOBatch, np.ndarray]:
        """Stacked pipeline rows -> the batch and each pair's (source, index), -1 where empty."""
        if self.packed:
            batch, keys = packed_batch(rows, self.max_pairs, self.members)
            self.longest_seen = max(self.longest_seen, int(rows["chosen_length"].max()))
            return batch, keys
        self.longest_seen = max(
            self.longest_seen, int(rows["chosen_length"].max()), int(rows["rejected_length"].max())
        )
        batch = DPOBatch(
            chosen=pair_side(rows, "chosen", rows["persona"], rows["stage"]),
            rejected=pair_side(rows, "rejected", rows["persona"], rows["stage"]),
            ref_chosen_logps=rows["ref_chosen"],
            ref_rejected_logps=rows["ref_rejected"],
            source_ids=rows["pair_source"],
        )
        return batch, np.stack([rows["key_source"], rows["key_index"]], axis=-1)[:, None]

    def host_batch(self, step: int) -> DPOBatch | PackedDPOBatch:
        """This process's rows of the next global batch (the pipeline keeps its own position)."""
        return self._batch(self.rows.next())[0]

    def global_batch(self, step: int) -> DPOBatch | PackedDPOBatch:
        return common.to_global(
            self.host_batch(step),
            common.batch_sharding(self.mesh),
            self.data.rows,
            self.cfg.train.batch_size,
        )

    # -- the reference pass ----------------------------------------------------------------

    def _pass_datasets(self, data: common.TaskData, reference) -> list:
        """One pass over each of this process's rows of `data`, as training rows."""
        tokens = self._tokens if data is self.data else self._eval_tokens

        def features(key, example):
            return self._pair_features(key, example, reference, tokens)

        return [
            pipeline.one_pass(
                data.shards[int(row)], features, self._names, self._options(), self._pad, self._combine
            )
            for row in data.rows
        ]

    def empty_row(self) -> dict[str, np.ndarray]:
        """A row with no pair in it (a row whose shard is done in a one-pass)."""
        template = self._features(*self._any_local_pair())
        if self.packed:
            row_len = self._options().row_len
            empty = {k: np.zeros(row_len, v.dtype) for k, v in template.items()}
            for side in ("chosen", "rejected"):
                for name in ("segment_ids", "positions"):
                    empty[f"{side}_input_ids_{name}"] = np.zeros(row_len, np.int32)
            return empty
        return {**{k: np.zeros_like(v) for k, v in template.items()}, "key_source": np.int64(-1)}

    def rows_batch(self, rows: dict) -> DPOBatch | PackedDPOBatch:
        return self._batch(rows)[0]

    def eval_datasets(self) -> list:
        return self._pass_datasets(self.eval_data, self.eval_reference)

    def _compute_reference(self, params, data: common.TaskData) -> dict:
        """The reference log-probs of every pair of `data` (see `reference_pass.py`), in the
        layout of the train step, so that at step 0 the policy's log-probs reproduce them."""
        chunk, graphdef, max_pairs = self.cfg.train.logits_chunk, self.graphdef, self.max_pairs

        def logps(params, batch):
            model = nnx.merge(graphdef, params)
            if isinstance(batch, PackedDPOBatch):
                return packed_pair_logps(model, batch.chosen, batch.rejected, max_pairs, chunk)[:2]
            return pair_logps(model, batch.chosen, batch.rejected, chunk)[:2]

        return reference_pass.compute(
            params,
            data,
            rows=common.one_pass_rows(self._pass_datasets(data, None), self.empty_row()),
            to_batch=self._batch,
            logps=logps,
            sharding=common.batch_sharding(self.mesh),
            batch_size=self.cfg.train.batch_size,
        )

    def _any_local_pair(self):
        for shard in self.data.shards.values():
            for source in shard.examples:
                if source:
                    return source[0]
        raise ValueError("this process's batch rows hold no preference pairs")

    @staticmethod
    def _local_reference(reference: dict, data: common.TaskData) -> dict:
        """{(source, index): (chosen, rejected)} for this process's pairs of `data`; a pair
        without a cached value means the cache does not match the data."""
        out = {}
        for shard in data.shards.values():
            for source in shard.examples:
                for (s, i), _ in source:
                    c, r = (
                        reference[side][s][i] if i < len(reference[side][s]) else np.nan for side in SIDES
                    )
                    if not (np.isfinite(c) and np.isfinite(r)):
                        raise ValueError(
                            f"the reference log-probs cache has no value for pair {i} of source {s}; delete "
                            "the run's reference_logps directory to recompute it"
                        )
                    out[(s, i)] = (float(c), float(r))
        return out

    # -- the loss ----------------------------------------------------------------------------

    def metrics_record(self, values: dict) -> dict:
        pairs = float(values["count"])
        record = {k: float(values[k]) for k in ("loss", "grad_norm", "learning_rate", "tokens", "truncated")}
        record["pairs"] = pairs
        record["packing_efficiency"] = float(values["tokens"]) / (
            2 * self.cfg.train.batch_size * self.cfg.train.seq_len
        )
        for key in DPO_METRICS:
            record[key] = float(values[key]) / pairs
        if "nll_loss" in values:  # the chosen answers' NLL per token (dpo.sft_weight)
            record["nll_loss"] = float(values["nll_loss"]) / pairs
        groups = self.groups
        for kind, names in (
            ("persona", groups.personas),
            ("stage", groups.stages),
            ("source", groups.pair_sources),
        ):
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

    def data_state(self) -> dict:
        return self.rows.state()

    def restore_data_state(self, states: dict) -> None:
        self.rows.restore(states)

    def check_resume(self, saved: dict) -> None:
        self.data.check_resume(saved)

    def close(self) -> None:
        self.rows.close()
