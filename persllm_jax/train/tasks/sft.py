"""Stage 1 of PersLLM: personified conversational SFT (assistant-only loss, data mixtures)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax import losses
from persllm_jax.data import chat_tokenize, formats, pipeline
from persllm_jax.train.batches import SFTBatch
from persllm_jax.train.config import RunConfig
from persllm_jax.train.tasks import common
from persllm_jax.train.tasks.token_cache import TokenCache

log = logging.getLogger(__name__)


# The per-token arrays of one SFT example in the input pipeline (see data/pipeline.py).
FEATURES = ("input_ids", "targets", "loss_mask", "persona", "stage", "length")


def sft_arrays(tokenizer, example, seq_len: int) -> dict[str, np.ndarray]:
    tokenized = chat_tokenize.tokenize_sft(tokenizer, example)
    return chat_tokenize.to_training_arrays(tokenized, seq_len, pad_id(tokenizer))._asdict()


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sequence_features(
    arrays: chat_tokenize.TrainingArrays, persona: int, stage: int
) -> dict[str, np.ndarray]:
    """One cut sequence's real tokens as pipeline features; ids are stored +1 so that padding
    (0) reads as -1, no group."""
    n = int(arrays.attention_mask.sum())
    length = np.zeros(n, np.int32)
    length[0] = arrays.length
    return {
        "input_ids": arrays.input_ids[:n],
        "targets": arrays.targets[:n],
        "loss_mask": arrays.loss_mask[:n],
        "persona": np.full(n, persona + 1, np.int32),
        "stage": np.full(n, stage + 1, np.int32),
        "length": length,
    }


def batch_from_rows(rows: dict[str, np.ndarray]) -> SFTBatch:
    """Stacked pipeline rows (packed or one segment each) -> an SFTBatch in the packed layout."""
    return SFTBatch(
        input_ids=rows["input_ids"],
        targets=rows["targets"],
        loss_mask=rows["loss_mask"],
        attention_mask=rows["segment_ids"] > 0,
        persona_ids=rows["persona"] - 1,
        stage_ids=rows["stage"] - 1,
        length=rows["length"],
        segment_ids=rows["segment_ids"],
        positions=rows["positions"],
    )


def token_logps(model, batch: SFTBatch, chunk_size: int, dropout_key=None):
    """Log-probs [B, T] of the trained targets (`loss_mask`), 0 elsewhere: the vocabulary
    projection runs only where a loss reads it (packed rows: each sequence sees only itself).
    `dropout_key`: the adapters' dropout of a training step (none without it)."""
    extra = {} if dropout_key is None else {"dropout_key": dropout_key}  # only a training step drops
    hidden = model.hidden_states(
        batch.input_ids, batch.attention_mask, batch.positions, batch.segment_ids, **extra
    )
    kernel = model.output_kernel()
    return losses.token_logps(hidden, kernel, batch.targets, chunk_size=chunk_size, where_BT=batch.loss_mask)


def sequence_nll(model, batch: SFTBatch, chunk_size: int, dropout_key=None):
    """Summed negative log-likelihood of the trained targets per row [B], and their count [B]."""
    logps = token_logps(model, batch, chunk_size, dropout_key)
    mask = batch.loss_mask.astype(jnp.float32)
    return -(logps * mask).sum(-1), mask.sum(-1)


def per_token(ids, shape):
    """Per-row ids [B] broadcast to the tokens [B, T]; per-token ids as they are."""
    return ids if ids.ndim == 2 else jnp.broadcast_to(ids[:, None], shape)


def sft_loss(
    model, batch: SFTBatch, *, chunk_size: int, num_personas: int = 0, num_stages: int = 0, dropout_key=None
):
    """(summed NLL of trained tokens, their count, metric sums incl. per-persona/stage slices)."""
    logps = token_logps(model, batch, chunk_size, dropout_key)
    mask = batch.loss_mask.astype(jnp.float32)
    nll_BT = -(logps * mask)
    shape = batch.input_ids.shape
    persona, stage = (
        per_token(batch.persona_ids, shape).reshape(-1),
        per_token(batch.stage_ids, shape).reshape(-1),
    )
    sums = {
        "tokens": batch.attention_mask.sum().astype(jnp.float32),
        "truncated": (batch.length > shape[1]).sum().astype(jnp.float32),
        "sequences": (batch.length > 0).sum().astype(jnp.float32),
        "persona_nll": common.segment_sums(nll_BT.reshape(-1), persona, num_personas),
        "persona_count": common.segment_sums(mask.reshape(-1), persona, num_personas),
        "stage_nll": common.segment_sums(nll_BT.reshape(-1), stage, num_stages),
        "stage_count": common.segment_sums(mask.reshape(-1), stage, num_stages),
    }
    return nll_BT.sum(), mask.sum(), sums


def batch_shardings(mesh) -> SFTBatch:
    sharding = common.batch_sharding(mesh)
    return SFTBatch(*([sharding] * 9))


def abstract_batch(
    cfg: RunConfig, shardings: SFTBatch, rows: int | None = None, row_len: int = 0
) -> SFTBatch:
    """The shapes and dtypes of a global batch (what `SFTTask.global_batch` returns), no data."""
    b, t = rows or cfg.train.batch_size, row_len or cfg.train.seq_len
    shapes = {"input_ids": ((b, t), jnp.int32), "targets": ((b, t), jnp.int32), "loss_mask": ((b, t), bool)}
    shapes |= {
        name: ((b, t), jnp.int32)
        for name in ("persona_ids", "stage_ids", "length", "segment_ids", "positions")
    }
    shapes["attention_mask"] = ((b, t), bool)
    return SFTBatch(
        **{
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(shardings, name))
            for name, (shape, dtype) in shapes.items()
        }
    )


def make_loss_fn(cfg: RunConfig, num_personas: int, num_stages: int):
    def loss_fn(model, batch: SFTBatch, frozen, dropout_key=None):
        return sft_loss(
            model,
            batch,
            chunk_size=cfg.train.logits_chunk,
            num_personas=num_personas,
            num_stages=num_stages,
            dropout_key=dropout_key,
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
        self._eval_tokens = TokenCache(lambda example: chat_tokenize.tokenize_sft(tokenizer, example))
        self.longest_seen = 0  # tokens of the longest sequence this host has loaded, before cutting
        self.options = common.pipeline_options(cfg, cfg.train.seq_len)
        self.rows = self.data.host_rows(self._features, FEATURES, self.options, pipeline.one_segment)
        held_out = cfg.eval.every_steps > 0
        self.eval_data = common.TaskData(cfg, formats.sft_example, mesh, held_out=True) if held_out else None
        log.info(
            "SFT data: %s examples from %d sources (this process's rows); personas %s; stages %s; packing %s",
            [len(s) for s in self.examples],
            len(self.examples),
            self.groups.personas,
            self.groups.stages,
            "on" if cfg.train.packing else "off",
        )

    def _features(self, key, example, cache: TokenCache | None = None) -> dict[str, np.ndarray]:
        tokens = (cache or self._tokens).get(key, example)
        arrays = chat_tokenize.to_training_arrays(tokens, self.cfg.train.seq_len, pad_id(self.tokenizer))
        return sequence_features(arrays, *self.groups.ids(example))

    # -- held-out evaluation (train/held_out.py) ------------------------------------------------

    def eval_datasets(self) -> list:
        """One pass over each of this process's rows of the held-out data, as training rows."""

        def features(key, example):
            return self._features(key, example, self._eval_tokens)

        return [
            pipeline.one_pass(
                self.eval_data.shards[int(row)], features, FEATURES, self.options, pipeline.one_segment
            )
            for row in self.eval_data.rows
        ]

    def empty_row(self) -> dict[str, np.ndarray]:
        """A row with nothing in it (a row whose held-out shard is done)."""
        return pipeline.one_segment({name: np.zeros(0, np.int32) for name in FEATURES}, self.options.row_len)

    def rows_batch(self, rows: dict[str, np.ndarray]) -> SFTBatch:
        return batch_from_rows(rows)

    def host_batch(self, step: int) -> SFTBatch:
        """This process's rows of the next global batch (the pipeline keeps its own position)."""
        batch = batch_from_rows(self.rows.next())
        self.longest_seen = max(self.longest_seen, int(batch.length.max()))
        return batch

    def global_batch(self, step: int) -> SFTBatch:
        return common.to_global(
            self.host_batch(step), self.batch_shardings.input_ids, self.data.rows, self.cfg.train.batch_size
        )

    def metrics_record(self, values: dict) -> dict:
        keys = ("loss", "grad_norm", "learning_rate", "tokens", "truncated", "sequences")
        record = {k: float(values[k]) for k in keys}
        record["trained_tokens"] = float(values["count"])
        record["packing_efficiency"] = float(values["tokens"]) / (
            self.cfg.train.batch_size * self.cfg.train.seq_len
        )
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

    def data_state(self) -> dict:
        return self.rows.state()

    def restore_data_state(self, states: dict) -> None:
        self.rows.restore(states)

    def check_resume(self, saved: dict) -> None:
        self.data.check_resume(saved)

    def close(self) -> None:
        self.rows.close()
