"""Held-out likelihood metrics: perplexity of persona dialogues and DPO metrics of preference pairs.

Both are teacher-forced passes over the same tokenization the trainers use (assistant tokens only),
so an evaluation number and a training number of the same data agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax import losses
from persllm_jax.train.batches import SFTBatch
from persllm_jax.train.tasks.dpo import pair_arrays, pair_side
from persllm_jax.train.tasks.dpo_loss import pair_logps
from persllm_jax.train.tasks.sft import sequence_nll, sft_arrays


def _no_groups(n: int) -> np.ndarray:
    return np.full((n,), -1, np.int32)


def _batches(rows: list[dict], batch_size: int):
    """Stacked rows in fixed-size batches; the last is padded with copies of its first row."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - real)
        yield real, {name: np.stack([r[name] for r in chunk]) for name in chunk[0]}


class LikelihoodScorer:
    """Sequence log-likelihoods of one model, jit-compiled once per batch shape."""

    def __init__(self, model, tokenizer, *, seq_len: int = 1024, batch_size: int = 8, chunk_size: int = 512):
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        graphdef, self.state = nnx.split(model)

        @jax.jit
        def nll(state, batch: SFTBatch):
            return sequence_nll(nnx.merge(graphdef, state), batch, chunk_size)

        @jax.jit
        def pairs(state, chosen: SFTBatch, rejected: SFTBatch):
            return pair_logps(nnx.merge(graphdef, state), chosen, rejected, chunk_size)

        self._nll, self._pairs = nll, pairs

    def dialogue_nll(self, examples: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Summed NLL of the assistant tokens of each SFT example [N], and their counts [N]."""
        rows = [sft_arrays(self.tokenizer, e, self.seq_len) for e in examples]
        nll, count = [], []
        for real, b in _batches(rows, self.batch_size):
            groups = _no_groups(self.batch_size)
            out = self._nll(self.state, SFTBatch(**b, persona_ids=groups, stage_ids=groups))
            nll.append(np.asarray(out[0])[:real])
            count.append(np.asarray(out[1])[:real])
        return np.concatenate(nll), np.concatenate(count)

    def pair_logps(self, examples: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Summed answer log-probs of the chosen [N] and rejected [N] side of each preference pair."""
        rows = [pair_arrays(self.tokenizer, e, self.seq_len) for e in examples]
        chosen, rejected = [], []
        for real, b in _batches(rows, self.batch_size):
            groups = _no_groups(self.batch_size)
            out = self._pairs(
                self.state, pair_side(b, "chosen", groups, groups), pair_side(b, "rejected", groups, groups)
            )
            chosen.append(np.asarray(out[0])[:real])
            rejected.append(np.asarray(out[1])[:real])
        return np.concatenate(chosen), np.concatenate(rejected)


def perplexity(nll: np.ndarray, counts: np.ndarray) -> dict:
    """Token-level perplexity over all examples: exp(total NLL / total tokens)."""
    tokens = float(counts.sum())
    mean_nll = float(nll.sum()) / tokens if tokens else float("nan")
    return {"perplexity": math.exp(mean_nll) if tokens else None, "nll": mean_nll, "n_tokens": int(tokens)}


def dpo_metrics(
    policy: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray], beta: float
) -> dict:
    """TRL's reward metrics on held-out pairs: rewards are beta * (policy - reference) log-prob.

    `preference_accuracy` needs no reference: the share of pairs where the model itself gives the
    chosen answer the higher log-probability."""
    chosen_r, rejected_r = losses.dpo_rewards(
        jnp.asarray(policy[0]),
        jnp.asarray(policy[1]),
        jnp.asarray(reference[0]),
        jnp.asarray(reference[1]),
        beta,
    )
    chosen_r, rejected_r = np.asarray(chosen_r), np.asarray(rejected_r)
    return {
        "reward_accuracy": float((chosen_r > rejected_r).mean()),
        "reward_margin": float((chosen_r - rejected_r).mean()),
        "chosen_reward": float(chosen_r.mean()),
        "rejected_reward": float(rejected_r.mean()),
        "preference_accuracy": float((policy[0] > policy[1]).mean()),
        "n_pairs": int(len(chosen_r)),
    }
