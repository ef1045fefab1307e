"""A Flax NNX decoder for the Llama family (Llama, Qwen2, Qwen3, Mistral) and Gemma 3 as
transformers defines them.

Layers are stacked (every layer parameter has a leading `layers` axis) and run with
`jax.lax.scan`, so compile time does not grow with depth and rematerialization applies per layer.
Sliding-window (local) and global layers share the scan body: a local layer differs only in its
window and its rotary tables, which the scan hands each layer with its parameters.
Parameters live in `param_dtype`; matmuls run in `compute_dtype`; norms, softmax and logits in fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persllm_jax.model import rope
from persllm_jax.model.attention import Attention, DenseMask, Segments, attend
from persllm_jax.model.block_attention import NO_WINDOW
from persllm_jax.model.config import ModelConfig
from persllm_jax.model.layers import MLP, RMSNorm, param, subkeys
from persllm_jax.model.sharding import constrain

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; Gemma also normalizes each block's output (`attn_out_norm`,
    `mlp_out_norm`) before adding it to the residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg)  # the MLP's input norm
        self.mlp = MLP(cfg, rngs=rngs)
        self.attn_out_norm = RMSNorm(cfg.hidden_size, cfg) if cfg.is_gemma else None
        self.mlp_out_norm = RMSNorm(cfg.hidden_size, cfg) if cfg.is_gemma else None

    def __call__(self, x_BTD, cos, sin, mask, cache=None, dropout_key=None, window=None):
        attn_key, mlp_key = subkeys(dropout_key, 2)
        if cache is None:
            attn_out, new_cache = (
                self.attn(self.input_norm(x_BTD), cos, sin, mask, dropout_key=attn_key, window=window),
                None,
            )
        else:
            attn_out, new_cache = self.attn(self.input_norm(x_BTD), cos, sin, mask, cache)
        if self.attn_out_norm is not None:
            attn_out = self.attn_out_norm(attn_out)
        x_BTD = x_BTD + attn_out
        mlp_out = self.mlp(self.post_attn_norm(x_BTD), mlp_key)
        if self.mlp_out_norm is not None:
            mlp_out = self.mlp_out_norm(mlp_out)
        x_BTD = x_BTD + mlp_out
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        return x_BTD if cache is None else (x_BTD, new_cache)


class CausalLM(nnx.Module):
    """Token ids -> logits. `hidden_states` and `logits_from_hidden` let losses chunk the head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.param_dtype)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs):
            return DecoderLayer(cfg, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        )
        # LoRA runs: the trained change of the embedding rows `cfg.lora_token_rows` (zero at the
        # start, so the base is unchanged; with tied embeddings it moves their output rows too),
        # float32 like the adapters whatever the base's dtype.
        self.token_rows = (
            nnx.LoRAParam(
                jnp.zeros((len(cfg.lora_token_rows), cfg.hidden_size), jnp.float32),
                logical_axes=(None, "embed"),
            )
            if cfg.lora_rank and cfg.lora_token_rows
            else None
        )

    def hidden_states(
        self, input_ids_BT, attention_mask_BT=None, positions_BT=None, segment_ids_BT=None, dropout_key=None
    ):
        """Final-normed hidden states [B, T, D] in compute dtype.

        `dropout_key` (a training step of a LoRA run with `lora_dropout`) drops part of each
        adapter's input, with a key of its own per layer and projection; without it nothing drops.

        Packed rows give `segment_ids_BT` (1, 2, ... for the sequences packed into a row, 0 for
        padding) and `positions_BT` (each sequence's own positions, restarting at 0): a token then
        attends only to the earlier tokens of its own segment. Without segment ids, the real tokens
        of `attention_mask_BT` form one sequence per row."""
        cfg = self.cfg
        b, t = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attention_mask(cfg.attention_impl, b, t, attention_mask_BT, segment_ids_BT)
        rotary = _rotary_tables(cfg, positions_BT)
        x_BTD = self._embed(input_ids_BT)
        graphdef, stacked_state = nnx.split(self.layers)

        dropping = dropout_key is not None and cfg.lora_rank > 0 and cfg.lora_dropout > 0

        def one_layer(x, inputs):
            layer_state, local, layer_key = inputs
            layer = nnx.merge(graphdef, layer_state)
            cos, sin, window = _layer_rotary_and_window(cfg, rotary, local)
            return layer(x, cos, sin, mask, dropout_key=layer_key, window=window), None

        if cfg.remat != "none":  # a dropout mask is recomputed from its key, not saved
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        keys = jax.random.split(dropout_key, cfg.num_layers) if dropping else None
        x_BTD, _ = jax.lax.scan(one_layer, x_BTD, (stacked_state, _local_layers(cfg), keys))
        return self.final_norm(x_BTD)

    def _embed(self, input_ids_BT):
        x_BTD = jnp.take(self.embed[...], input_ids_BT, axis=0)
        if self.token_rows is not None:
            rows = jnp.asarray(self.cfg.lora_token_rows, jnp.int32)
            hits_BTR = (input_ids_BT[..., None] == rows).astype(jnp.float32)
            change_BTD = jnp.einsum("btr,rd->btd", hits_BTR, self.token_rows[...].astype(jnp.float32))
            # a changed row is stored as the table stores rows (as the merged export holds it)
            x_BTD = (x_BTD.astype(jnp.float32) + change_BTD).astype(x_BTD.dtype)
        if self.cfg.is_gemma:
            # the (changed) rows scaled by sqrt(hidden) in the table's dtype, as transformers does
            x_BTD = x_BTD * jnp.asarray(math.sqrt(self.cfg.hidden_size), x_BTD.dtype)
        return constrain(x_BTD.astype(self.cfg.compute_dtype), ("batch", "length", "act_embed"))

    def init_cache(self, batch: int, length: int):
        """An empty KV cache in compute dtype: (k, v), each [layers, B, S, kv_heads, head_dim]."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)

    def cached_hidden_states(
        self, input_ids_BT, positions_BT, key_valid_BS, cache, write_index, key_positions_BS=None
    ):
        """Hidden states of T new tokens written into the cache at slots write_index..+T-1.

        `key_valid_BS` marks the cache slots holding real tokens (False for left padding); a
        query sees a slot when it is valid and not after the query's own slot. A sliding-window
        layer also needs the slot's token within the window before the query, by position:
        `key_positions_BS` gives each slot's position; by default a row's slots hold consecutive
        positions (left-padded rows). Returns (final-normed hidden [B, T, D], updated cache)."""
        cfg = self.cfg
        t = input_ids_BT.shape[1]
        s = key_valid_BS.shape[1]
        slots_S = jnp.arange(s, dtype=jnp.int32)
        query_slot_T = write_index + jnp.arange(t, dtype=jnp.int32)
        causal_TS = slots_S[None, :] <= query_slot_T[:, None]
        mask_BTS = causal_TS[None, :, :] & key_valid_BS[:, None, :]
        if key_positions_BS is None:
            key_positions_BS = slots_S[None, :] - (query_slot_T[0] - positions_BT[:, :1])
        behind_BTS = positions_BT[:, :, None] - key_positions_BS[:, None, :]
        rotary = _rotary_tables(cfg, positions_BT)
        x_BTD = self._embed(input_ids_BT)
        graphdef, stacked_state = nnx.split(self.layers)
        scale = cfg.attention_scale

        def one_layer(carry, layer_inputs):
            """Write layer `index`'s new keys and values at write_index and attend over all its
            slots. The cache stays in the scan carry, so a step writes only its new slots in place."""
            x, (k_all, v_all) = carry
            layer_state, local, index = layer_inputs
            layer = nnx.merge(graphdef, layer_state)
            cos, sin, window = _layer_rotary_and_window(cfg, rotary, local)
            mask = mask_BTS if window is None else mask_BTS & (behind_BTS < window)

            def cached(q, k, v):
                at = (index, 0, write_index, 0, 0)
                k_new = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
                v_new = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
                k_layer = jax.lax.dynamic_index_in_dim(k_new, index, keepdims=False)
                v_layer = jax.lax.dynamic_index_in_dim(v_new, index, keepdims=False)
                return attend(q, k_layer, v_layer, mask, "xla", scale=scale), (k_new, v_new)

            x, arrays = layer(x, cos, sin, None, cached)
            return (x, arrays), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        xs = (stacked_state, _local_layers(cfg), layer_ids)
        (x_BTD, cache), _ = jax.lax.scan(one_layer, (x_BTD, tuple(cache)), xs)
        return self.final_norm(x_BTD), cache

    def output_kernel(self):
        """The [D, V] output projection (the embedding transposed when tied)."""
        if self.lm_head is not None:
            return self.lm_head[...]
        table = self.embed[...]
        if self.token_rows is not None:
            rows = jnp.asarray(self.cfg.lora_token_rows, jnp.int32)
            changed = table[rows].astype(jnp.float32) + self.token_rows[...].astype(jnp.float32)
            table = table.at[rows].set(changed.astype(table.dtype))
        return table.T

    def logits_from_hidden(self, hidden_BTD):
        kernel = self.output_kernel().astype(self.cfg.compute_dtype)
        logits = jnp.einsum("btd,dv->btv", hidden_BTD, kernel, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids_BT, attention_mask_BT=None, positions_BT=None):
        """Logits [B, T, V] in float32."""
        return self.logits_from_hidden(self.hidden_states(input_ids_BT, attention_mask_BT, positions_BT))


def _local_layers(cfg: ModelConfig):
    """Whether each layer is a sliding-window one ([L] bool, scanned with the layers), or None
    when no layer is (the scan then carries nothing for it)."""
    return jnp.asarray(cfg.sliding_layers) if cfg.has_sliding_layers else None


def _rotary_tables(cfg: ModelConfig, positions_BT):
    """(cos, sin) of the global layers, and of the local layers when there are any."""
    tables = rope.cos_sin(cfg, positions_BT)
    return (tables, rope.cos_sin(cfg, positions_BT, local=True)) if cfg.has_sliding_layers else (tables,)


def _layer_rotary_and_window(cfg: ModelConfig, rotary, local):
    """One layer's (cos, sin, window): the local tables and the sliding window where `local` (a
    traced bool, or a Python bool for a layer run on its own), else the global tables and no window
    (None when the model has no local layers or the layer is known to be global)."""
    if local is None or local is False:
        return (*rotary[0], None)
    if local is True:
        return (*rotary[1], cfg.sliding_window)
    (cos_g, sin_g), (cos_l, sin_l) = rotary
    window = jnp.where(local, jnp.int32(cfg.sliding_window), jnp.int32(NO_WINDOW))
    return jnp.where(local, cos_l, cos_g), jnp.where(local, sin_l, sin_g), window


def attention_mask(impl: str, b: int, t: int, attention_mask_BT=None, segment_ids_BT=None):
    """The mask in the form `attend` takes for `impl` (see attention.py)."""
    packed = segment_ids_BT is not None
    if not packed:
        segment_ids_BT = (
            jnp.ones((b, t), jnp.int32) if attention_mask_BT is None else attention_mask_BT.astype(jnp.int32)
        )
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    if impl == "splash":  # the kernel takes segment ids itself
        return segment_ids_BT
    if impl == "cudnn" and not packed:  # one sequence per row: cuDNN's fused kernel takes lengths
        _check_right_padded(attention_mask_BT)
        return jnp.full((b,), t, jnp.int32) if attention_mask_BT is None else segment_ids_BT.sum(-1)
    if impl == "xla":
        return Segments(segment_ids_BT)
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask_BTS = same_BTS & causal_TS[None] & (segment_ids_BT[:, None, :] > 0)
    # cuDNN with packed rows takes the block-diagonal mask as a dense one (with its causal flag).
    return DenseMask(mask_BTS)


def _check_right_padded(attention_mask_BT) -> None:
    """cuDNN's fused kernel takes each row's length, so only right padding (real tokens first)
    describes the mask; left padding would attend to the padding. A concrete mask is checked
    here; inside `jit` the callers' masks are right-padded by construction (training and
    evaluation batches), and generation uses XLA attention over its KV cache."""
    if attention_mask_BT is None or isinstance(attention_mask_BT, jax.core.Tracer):
        return
    mask = np.asarray(attention_mask_BT).astype(bool)
    prefix = np.arange(mask.shape[1])[None, :] < mask.sum(axis=1, keepdims=True)
    if not (mask == prefix).all():
        rows = np.flatnonzero((mask != prefix).any(axis=1)).tolist()
        raise ValueError(
            f"attention_impl cudnn needs right padding (real tokens first); rows {rows[:8]} of "
            "attention_mask are padded otherwise: pad on the right, or use attention_impl xla"
        )


def init_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialized model on the default device (tiny models, benchmarks)."""
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """The model's structure with ShapeDtypeStruct leaves; allocates nothing."""
    return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
