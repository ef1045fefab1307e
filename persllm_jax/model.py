"""A Flax NNX decoder for the Llama family (Llama, Qwen2, Mistral) as transformers defines it.

Layers are stacked (every layer parameter has a leading `layers` axis) and run with
`jax.lax.scan`, so compile time does not grow with depth and rematerialization applies per layer.
Parameters live in `param_dtype`; matmuls run in `compute_dtype`; norms, softmax and logits in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persllm_jax import rope
from persllm_jax.model_config import ModelConfig
from persllm_jax.sharding import constrain

# Large negative instead of -inf so that a fully masked row (a left-padding query) gives a
# uniform softmax rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of torch's weight)."""

    def __init__(self, d_in, d_out, axes, *, bias, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        self.kernel = _param(rngs, (d_in, d_out), axes, dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), logical_axes=axes[1:]) if bias else None
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x):
        y = x.astype(self.compute_dtype) @ self.kernel[...].astype(self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), logical_axes=("norm",))
        self.eps = cfg.rms_norm_eps
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.compute_dtype) * normed.astype(self.compute_dtype)


def attend(q_BTNH, k_BSKH, v_BSKH, mask, impl: str = "xla"):
    """Grouped-query attention; N query heads share K key/value heads. Returns [B, T, N, H].

    `mask` is a boolean [B, T, S] (xla), or for cudnn the number of real keys per row [B]
    (causal, right padding: cuDNN's fused kernel takes lengths, not a dense mask)."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, is_causal=True, key_value_seq_lengths=mask, implementation="cudnn"
        )
    mask_BTS = mask
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(
            d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs
        )
        self.v_proj = Linear(
            d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs
        )
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), bias=cfg.o_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x_BTD, cos, sin, mask, cache=None):
        """With `cache` = (k [L, B, S, K, H], v, layer, write_index), this step's keys and values
        are written into `layer` at `write_index` and attention runs over that layer's whole cache
        (`mask` is then [B, T, S]); the updated (k, v) is returned alongside the output."""
        cfg = self.cfg
        b, t, _ = x_BTD.shape
        q = self.q_proj(x_BTD).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_BTD).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_BTD).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = constrain(rope.apply_rotary(q, cos, sin), ("batch", "length", "act_heads", None))
        k = constrain(rope.apply_rotary(k, cos, sin), ("batch", "length", "act_heads", None))
        if cache is None:
            out = attend(q, k, v, mask, cfg.attention_impl)
            return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim))
        # The cache holds every layer ([L, B, S, K, H]) and stays in the scan carry, so each step
        # writes only its new slots in place instead of copying the layer's whole cache.
        k_all, v_all, layer, write_index = cache
        at = (layer, 0, write_index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
        v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
        k_layer = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)
        v_layer = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)
        out = attend(q, k_layer, v_layer, mask, "xla")
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), (k_all, v_all)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x_BTD):
        hidden = jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(constrain(hidden, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, cos, sin, mask, cache=None):
        if cache is None:
            attn_out, new_cache = self.attn(self.input_norm(x_BTD), cos, sin, mask), None
        else:
            attn_out, new_cache = self.attn(self.input_norm(x_BTD), cos, sin, mask, cache)
        x_BTD = x_BTD + attn_out
        x_BTD = x_BTD + self.mlp(self.post_attn_norm(x_BTD))
        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        return x_BTD if cache is None else (x_BTD, new_cache)


class CausalLM(nnx.Module):
    """Token ids -> logits. `hidden_states` and `logits_from_hidden` let losses chunk the head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs):
            return DecoderLayer(cfg, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        )

    def hidden_states(self, input_ids_BT, attention_mask_BT=None, positions_BT=None):
        """Final-normed hidden states [B, T, D] in compute dtype."""
        cfg = self.cfg
        b, t = input_ids_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cfg.attention_impl == "cudnn":
            mask = (
                jnp.full((b,), t, jnp.int32)
                if attention_mask_BT is None
                else attention_mask_BT.astype(jnp.int32).sum(-1)
            )
        else:
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), dtype=bool)), (b, t, t))
            if attention_mask_BT is not None:
                mask = mask & attention_mask_BT.astype(bool)[:, None, :]
        cos, sin = rope.cos_sin(cfg, positions_BT)
        x_BTD = self._embed(input_ids_BT)
        graphdef, stacked_state = nnx.split(self.layers)

        def one_layer(x, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos, sin, mask), None

        if cfg.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x_BTD, _ = jax.lax.scan(one_layer, x_BTD, stacked_state)
        return self.final_norm(x_BTD)

    def _embed(self, input_ids_BT):
        x_BTD = jnp.take(self.embed[...], input_ids_BT, axis=0).astype(self.cfg.compute_dtype)
        return constrain(x_BTD, ("batch", "length", "act_embed"))

    def init_cache(self, batch: int, length: int):
        """An empty KV cache: (k, v), each [layers, B, S, kv_heads, head_dim] in compute dtype."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)

    def cached_hidden_states(self, input_ids_BT, positions_BT, key_valid_BS, cache, write_index):
        """Hidden states of T new tokens written into the cache at slots write_index..+T-1.

        `key_valid_BS` marks the cache slots holding real tokens (False for left padding); a
        query sees a slot when it is valid and not after the query's own slot. Returns
        (final-normed hidden [B, T, D], updated cache)."""
        cfg = self.cfg
        t = input_ids_BT.shape[1]
        s = key_valid_BS.shape[1]
        query_slot_T = write_index + jnp.arange(t, dtype=jnp.int32)
        causal_TS = jnp.arange(s, dtype=jnp.int32)[None, :] <= query_slot_T[:, None]
        mask_BTS = causal_TS[None, :, :] & key_valid_BS[:, None, :]
        cos, sin = rope.cos_sin(cfg, positions_BT)
        x_BTD = self._embed(input_ids_BT)
        graphdef, stacked_state = nnx.split(self.layers)

        def one_layer(carry, layer_inputs):
            x, k_all, v_all = carry
            layer_state, index = layer_inputs
            layer = nnx.merge(graphdef, layer_state)
            x, (k_all, v_all) = layer(x, cos, sin, mask_BTS, (k_all, v_all, index, write_index))
            return (x, k_all, v_all), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x_BTD, k_all, v_all), _ = jax.lax.scan(one_layer, (x_BTD, *cache), (stacked_state, layer_ids))
        return self.final_norm(x_BTD), (k_all, v_all)

    def output_kernel(self):
        """The [D, V] output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits_from_hidden(self, hidden_BTD):
        kernel = self.output_kernel().astype(self.cfg.compute_dtype)
        logits = jnp.einsum("btd,dv->btv", hidden_BTD, kernel, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids_BT, attention_mask_BT=None, positions_BT=None):
        """Logits [B, T, V] in float32."""
        return self.logits_from_hidden(self.hidden_states(input_ids_BT, attention_mask_BT, positions_BT))


def init_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialized model on the default device (tiny models, benchmarks)."""
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """The model's structure with ShapeDtypeStruct leaves; allocates nothing."""
    return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
