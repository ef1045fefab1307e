"""Adding special tokens (the persona stage tokens) to a tokenizer and growing the model to match."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from persllm_jax.io.pretrained import (
    generation_config,
    set_generation_config,
    set_source_config,
    source_config,
    state_shardings_for,
)
from persllm_jax.model.decoder import CausalLM, abstract_model

log = logging.getLogger(__name__)


def token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """The ids of `tokens` (as `model.add_tokens` lists them, blanks dropped) in the tokenizer."""
    tokens = [t.strip() for t in tokens if t.strip()]
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)] if tokens else []


def register_tokens(tokenizer, tokens: Sequence[str], vocab_size: int) -> tuple[list[str], list[int], int]:
    """Add `tokens` to the tokenizer as special tokens (in place); (tokens, ids of the tokens the
    tokenizer did not have before, the model's vocabulary size after growing to fit it)."""
    tokens = [t.strip() for t in tokens if t.strip()]
    known = set(tokenizer.get_vocab())
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    token_ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, token_id in zip(tokens, token_ids):
        pieces = tokenizer.encode(token, add_special_tokens=False)
        if pieces != [token_id]:
            raise ValueError(f"token {token!r} does not encode as one token after adding it: {pieces}")
    added = [token_id for token, token_id in zip(tokens, token_ids) if token not in known]
    return tokens, added, max(vocab_size, len(tokenizer))


def add_special_tokens(
    model: CausalLM, tokenizer, tokens: Sequence[str], mesh: Mesh | None = None
) -> CausalLM:
    """Register `tokens` as special tokens and give each its own embedding row.

    The embedding (and an untied output head) grows to the tokenizer's new length. Only tokens
    the tokenizer did not have get a row initialized: past the old vocabulary, or a padding row
    no token used; they start at the mean of the model's existing rows (an "average" token rather
    than noise). A token already there (a stage token of an SFT run that DPO starts from) keeps
    its trained row. Returns a new model; `tokenizer` is changed in place.
    """
    cfg = model.cfg
    tokens, token_ids, new_vocab = register_tokens(tokenizer, tokens, cfg.vocab_size)
    if not token_ids and new_vocab == cfg.vocab_size:
        log.info("special tokens %s are already in the vocabulary; their rows are kept", tokens)
        return model
    new_cfg = cfg.replace(vocab_size=new_vocab)
    graphdef, abstract_state = nnx.split(abstract_model(new_cfg))
    shardings = state_shardings_for(abstract_state, mesh)
    state = nnx.state(model)
    ids = jnp.asarray(token_ids, dtype=jnp.int32)

    def grow(table, axis, sharding):
        def fn(table):
            mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
            pad_shape = list(table.shape)
            pad_shape[axis] = new_vocab - cfg.vocab_size
            grown = jnp.concatenate([table, jnp.broadcast_to(mean, pad_shape)], axis=axis)
            rows = jnp.moveaxis(grown, axis, 0).at[ids].set(jnp.moveaxis(mean, axis, 0)[0])
            return jnp.moveaxis(rows, 0, axis)

        return jax.jit(fn, out_shardings=sharding)(table)

    state["embed"] = shardings["embed"].replace(grow(state["embed"][...], 0, shardings["embed"].get_value()))
    if model.lm_head is not None:
        state["lm_head"] = shardings["lm_head"].replace(
            grow(state["lm_head"][...], 1, shardings["lm_head"].get_value())
        )
    grown = nnx.merge(graphdef, state)
    set_source_config(grown, source_config(model))
    set_generation_config(grown, generation_config(model))
    log.info(
        "special tokens %s: new ids %s start at the mean row; vocabulary %d -> %d",
        tokens,
        token_ids,
        cfg.vocab_size,
        new_vocab,
    )
    return grown
