"""Stage 1 of PersLLM: personified conversational SFT (assistant-only loss, data mixtures)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax import losses
from persllm_jax.data import chat_tokenize, formats
from persllm_jax.train.batches import SFTBatch
from persllm_jax.train.config import RunConfig
from persllm_jax.train.tasks import common
from persllm_jax.train.tasks.token_cache import TokenCache

log = logging.getLogger(__name__)


def stack_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-example training arrays -> [rows, ...] arrays."""
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def sft_arrays(tokenizer, example, seq_len: int) -> dict[str, np.ndarray]:
    tokenized = chat_tokenize.tokenize_sft(tokenizer, example)
    return chat_tokenize.to_training_arrays(tokenized, seq_len, pad_id(tokenizer))._asdict()


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sequence_nll(model, batch: SFTBatch, chunk_size: int):
    """Summed negative log-likelihood of the trained targets per sequence [B], and their count [B]."""
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    logps = losses.token_logps(hidden, model.output_kernel(), batch.targets, chunk_size=chunk_size)
    mask = batch.loss_mask.astype(jnp.float32)
    return -(logps * mask).sum(-1), mask.sum(-1)


def sft_loss(model, batch: SFTBatch, *, chunk_size: int, num_personas: int = 0, num_stages: int = 0):
    """(summed NLL of trained tokens, their count, metric sums incl. per-persona/stage slices)."""
    nll_B, count_B = sequence_nll(model, batch, chunk_size)
    sums = {
        "tokens": batch.attention_mask.sum().astype(jnp.float32),
        "truncated": (batch.length > batch.input_ids.shape[1]).sum().astype(jnp.float32),
        "persona_nll": common.segment_sums(nll_B, batch.persona_ids, num_personas),
        "persona_count": common.segment_sums(count_B, batch.persona_ids, num_personas),
        "stage_nll": common.segment_sums(nll_B, batch.stage_ids, num_stages),
        "stage_count": common.segment_sums(count_B, batch.stage_ids, num_stages),
    }
    return nll_B.sum(), count_B.sum(), sums


def batch_shardings(mesh) -> SFTBatch:
    sharding = common.batch_sharding(mesh)
    return SFTBatch(*([sharding] * 7))


def abstract_batch(cfg: RunConfig, shardings: SFTBatch, rows: int | None = None) -> SFTBatch:
    """The shapes and dtypes of a global batch (what `SFTTask.global_batch` returns), no data."""
    b, t = rows or cfg.train.batch_size, cfg.train.seq_len
    shapes = {"input_ids": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32), "loss_mask": ((b, t), bool)}
    shapes |= {
        "attention_mask": ((b, t), bool),
        "persona_ids": ((b,), jnp.int32),
        "stage_ids": ((b,), jnp.int32),
        "length": ((b,), jnp.int32),
    }
    return SFTBatch(
        **{
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(shardings, name))
            for name, (shape, dtype) in shapes.items()
        }
    )


def make_loss_fn(cfg: RunConfig, num_personas: int, num_stages: int):
    def loss_fn(model, batch: SFTBatch, frozen):
        return sft_loss(
            model, batch, chunk_size=cfg.train.logits_chunk, num_personas=num_personas, num_stages=num_stages
        )

    return loss_fn


class SFTTask:
    name = "sft"

    def __init__(self, *, cfg: RunConfig, tokenizer, mesh, **_):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.data = common.TaskData(cfg, formats.sft_example, mesh)
        self.examples, self.groups = self.data.examples, self.data.groups
        self.batch_shardings = batch_shardings(mesh)
        self.loss_fn = make_loss_fn(cfg, len(self.groups.personas), len(self.groups.stages))
        self.frozen, self.frozen_shardings = None, None
        self._tokens = TokenCache(lambda example: chat_tokenize.tokenize_sft(tokenizer, example))
        self.longest_seen = 0  # tokens of the longest sequence this host has loaded, before cutting
        log.info(
            "SFT data: %s examples from %d sources; personas %s; stages %s",
            [len(s) for s in self.examples],
            len(self.examples),
            self.groups.personas,
            self.groups.stages,
        )

    def host_batch(self, step: int) -> SFTBatch:
        picked = self.data.local_picks(step)
        seq_len, pad = self.cfg.train.seq_len, pad_id(self.tokenizer)
        rows = stack_rows(
            [
                chat_tokenize.to_training_arrays(self._tokens.get(k, e), seq_len, pad)._asdict()
                for k, e in picked
            ]
        )
        ids = self.data.group_ids(picked)
        self.longest_seen = max(self.longest_seen, int(rows["length"].max()))
        return SFTBatch(**rows, persona_ids=ids[:, 0], stage_ids=ids[:, 1])

    def global_batch(self, step: int) -> SFTBatch:
        return common.to_global(
            self.host_batch(step), self.batch_shardings.input_ids, self.data.rows, self.cfg.train.batch_size
        )

    def metrics_record(self, values: dict) -> dict:
        record = {k: float(values[k]) for k in ("loss", "grad_norm", "learning_rate", "tokens", "truncated")}
        record["trained_tokens"] = float(values["count"])
        record.update(
            common.sliced_means(
                "loss", values["persona_nll"], values["persona_count"], self.groups.personas, "persona"
            )
        )
        record.update(
            common.sliced_means(
                "loss", values["stage_nll"], values["stage_count"], self.groups.stages, "stage"
            )
        )
        return record

    def data_position(self, step: int) -> dict:
        return self.data.position(step)

    def check_resume(self, saved: dict) -> None:
        self.data.check_resume(saved)
