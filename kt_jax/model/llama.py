"""Flax NNX Llama (Llama-2 MHA and Llama-3.x GQA) with packed-sequence support and logical axis names."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from kt_jax.errors import CheckpointError
from kt_jax.model.attention import BACKENDS, AttentionWindows, attention, dot_attention
from kt_jax.model.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from kt_jax.ops.matmul import BACKWARD_DOTS, explicit_backward_for, matmul
from kt_jax.sharding import RULES, ShardingRules, logical_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus numerics. Hashable: it is part of the model's static graph."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_scaling/rope_parameters items
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: bool = False  # rematerialise each block in the backward pass
    attention: str = "xla"  # xla | splash | cudnn | auto (kt_jax.model.attention)
    backward_dots: str = "auto"  # auto | explicit | autodiff: the matmul backward kt_jax.ops.matmul writes out (CPU)
    hf_extra_json: str = "{}"  # config.json fields kept only to write them back on export

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise CheckpointError(f"{name}={getattr(self, name)!r}; choose one of {sorted(DTYPES)}")
        if self.backward_dots not in BACKWARD_DOTS:
            raise CheckpointError(
                f"backward_dots={self.backward_dots!r}; choose one of {', '.join(BACKWARD_DOTS)}")
        if self.attention not in BACKENDS:
            raise CheckpointError(f"attention={self.attention!r}; choose one of {', '.join(BACKENDS)}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def hf_extra(self) -> dict[str, Any]:
        return json.loads(self.hf_extra_json)

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + d


@dataclasses.dataclass(frozen=True)
class ShardContext:
    """Mesh + rules the model uses to constrain activation layouts inside jit (static, hashable)."""

    mesh: Mesh
    rules: ShardingRules = dataclasses.field(default_factory=ShardingRules)

    def constrain(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        sharding = logical_sharding(logical_axes, x.shape, self.mesh, self.rules, what="activation")
        return jax.lax.with_sharding_constraint(x, sharding)


def _constrain(ctx: ShardContext | None, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    return x if ctx is None else ctx.constrain(x, axes)


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any, init: str = "normal"
) -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel, kernel [in, out] with logical axes; no bias (as in Llama)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: LlamaConfig, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (d_in, d_out), axes, DTYPES[cfg.param_dtype])
        self.dtype = DTYPES[cfg.dtype]
        self.explicit_backward = explicit_backward_for(cfg.backward_dots)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value().astype(self.dtype)
        return matmul(x.astype(self.dtype), kernel, explicit_backward=self.explicit_backward)


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), DTYPES[cfg.param_dtype], init="ones")
        self.eps = cfg.rms_norm_eps
        self.dtype = DTYPES[cfg.dtype]

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.get_value().astype(self.dtype) * x32.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), cfg, rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), cfg, rngs)
        self.backend = cfg.attention

    def __call__(
        self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_BxT: jax.Array | None,
        extra_mask_BxTxT: jax.Array | None, ctx: ShardContext | None = None,
        windows: AttentionWindows | None = None,
    ) -> jax.Array:
        b, t, _ = x_BxTxD.shape
        q = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mesh, rules = (ctx.mesh, ctx.rules) if ctx is not None else (None, RULES)
        out_BxTxHxD = attention(q, k, v, segment_ids_BxT, extra_mask_BxTxT, self.backend, mesh, rules, windows)
        return self.o_proj(out_BxTxHxD.reshape(b, t, self.num_heads * self.head_dim))

    def cached(
        self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, k_BxKxSxD: jax.Array, v_BxKxSxD: jax.Array,
        mask_BxTxS: jax.Array, index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of T new tokens written into cache slots [index, index + T); returns (out, k, v caches).

        Always the xla backend: the cache mask (valid slots up to each query's slot) is not a segment layout.
        """
        b, t, _ = x_BxTxD.shape
        q = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_BxKxSxD = jax.lax.dynamic_update_slice_in_dim(
            k_BxKxSxD, k.transpose(0, 2, 1, 3).astype(k_BxKxSxD.dtype), index, axis=2)
        v_BxKxSxD = jax.lax.dynamic_update_slice_in_dim(
            v_BxKxSxD, v.transpose(0, 2, 1, 3).astype(v_BxKxSxD.dtype), index, axis=2)
        out_BxTxHxD = dot_attention(q, k_BxKxSxD, v_BxKxSxD, mask_BxTxS, kv_layout="bksd")
        return self.o_proj(out_BxTxHxD.reshape(b, t, self.num_heads * self.head_dim)), k_BxKxSxD, v_BxKxSxD


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(
        self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_BxT: jax.Array | None,
        extra_mask_BxTxT: jax.Array | None, windows: AttentionWindows | None = None,
        ctx: ShardContext | None = None,
    ) -> jax.Array:
        attn = self.self_attn(self.input_layernorm(x_BxTxD), cos, sin, segment_ids_BxT, extra_mask_BxTxT, ctx,
                              windows)
        x_BxTxD = x_BxTxD + attn
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))

    def cached(
        self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array, k: jax.Array, v: jax.Array, mask_BxTxS: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on T new tokens with this layer's KV cache; returns (x, k cache, v cache)."""
        attn, k, v = self.self_attn.cached(self.input_layernorm(x_BxTxD), cos, sin, k, v, mask_BxTxS, index)
        x_BxTxD = x_BxTxD + attn
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD)), k, v


def _rematerialised(block: Block, *args: Any, ctx: ShardContext | None = None) -> jax.Array:
    """`block(*args)` whose activations are recomputed in the backward pass.

    A pure `jax.checkpoint` over the block's split state: `nnx.remat` writes the block's variables back to the
    caller's module, which fails when that module was built inside another trace (the train step rebuilds the
    model from its params inside value_and_grad and the gradient-accumulation scan).
    """
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a, ctx=ctx))(state, *args)


def stack_blocks(layers: Any) -> tuple[Any, Any] | None:
    """(one block's graphdef, every block's state stacked on a leading layer axis) for `hidden_states(scanned=...)`;
    None when the blocks differ in structure (e.g. adapters on some layers only). The stack is a copy of the
    blocks' weights."""
    split = [nnx.split(block) for block in layers]
    if not split or any(graphdef != split[0][0] for graphdef, _ in split[1:]):
        return None
    return split[0][0], _stack_states([state for _, state in split])


@jax.jit
def _stack_states(states: list[Any]) -> Any:
    # One program for every leaf: stacked eagerly, each leaf's stack was its own compiled op (0.3-0.7 s a call for
    # the 42M model's 9 leaves on 2 cores, against ~0.08 s with a warm compile cache).
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


class KVCache(NamedTuple):
    """Per-layer keys/values [B, K, S, D] (RoPE applied; head-major) and which slots hold real tokens [B, S]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid_BxS: jax.Array


_CACHE_AXES = ("batch", "act_heads", "seq", None)


class Llama(nnx.Module):
    """Decoder-only Llama. `model(input_ids)` -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, shard_ctx: ShardContext | None = None):
        self.config = cfg
        self.shard_ctx = shard_ctx
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), DTYPES[cfg.param_dtype])
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)]) if hasattr(nnx, "List") else [
            Block(cfg, rngs) for _ in range(cfg.num_layers)
        ]
        self.norm = RMSNorm(cfg.hidden_size, cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)

    def _embed(self, input_ids_BxT: jax.Array, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token embeddings [B, T, D] in the compute dtype and RoPE cos/sin [B, T, head_dim] for `positions`."""
        cfg = self.config
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        cos, sin = rotary_cos_sin(positions_BxT, inv_freq)
        x = jnp.take(self.embed_tokens.get_value(), input_ids_BxT, axis=0).astype(DTYPES[cfg.dtype])
        return _constrain(self.shard_ctx, x, ("batch", "seq", "act_embed")), cos, sin

    def hidden_states(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
        attn_mask_BxTxT: jax.Array | None = None,
        windows: AttentionWindows | None = None,
        scanned: tuple[Any, Any] | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] in the compute dtype.

        positions restart per packed segment (default 0..T-1); attention stays causal, inside equal
        segment ids, and inside `attn_mask` (e.g. grouped preference rows) when given; with `windows`
        (prefix-shared fact scoring), exactly as the windows say. With `scanned` (`stack_blocks` of this model's
        layers) the blocks run as one `lax.scan` body instead of unrolled: the same numbers to float32 rounding,
        and a program that traces, lowers and loads one block instead of every layer (inference only).
        """
        cfg, ctx = self.config, self.shard_ctx
        b, t = input_ids_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        x, cos, sin = self._embed(input_ids_BxT, positions_BxT)
        if scanned is not None:
            block_graphdef, stacked = scanned

            def body(x: jax.Array, block_state: Any) -> tuple[jax.Array, None]:
                x = nnx.merge(block_graphdef, block_state)(x, cos, sin, segment_ids_BxT, attn_mask_BxTxT, windows,
                                                           ctx=ctx)
                return _constrain(ctx, x, ("batch", "seq", "act_embed")), None

            return self.norm(jax.lax.scan(body, x, stacked)[0])
        for block in self.layers:
            args = (x, cos, sin, segment_ids_BxT, attn_mask_BxTxT, windows)
            x = _rematerialised(block, *args, ctx=ctx) if cfg.remat else block(*args, ctx=ctx)
            x = _constrain(ctx, x, ("batch", "seq", "act_embed"))
        return self.norm(x)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` rows of `length` slots in the compute dtype."""
        cfg = self.config
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        zeros = lambda: _constrain(self.shard_ctx, jnp.zeros(shape, DTYPES[cfg.dtype]), _CACHE_AXES)
        return KVCache(tuple(zeros() for _ in range(cfg.num_layers)), tuple(zeros() for _ in range(cfg.num_layers)),
                       jnp.zeros((batch, length), bool))

    def hidden_states_cached(
        self, input_ids_BxT: jax.Array, positions_BxT: jax.Array, valid_BxT: jax.Array, cache: KVCache,
        index: jax.Array | int,
    ) -> tuple[jax.Array, KVCache]:
        """Final-normed hidden states [B, T, D] of T new tokens stored at cache slots [index, index + T).

        Token t attends to every valid slot <= index + t (slots are in time order; padding is marked invalid
        by `valid_BxT`, so rows may be left- or right-padded); `positions_BxT` are the RoPE positions.
        """
        ctx = self.shard_ctx
        t = input_ids_BxT.shape[1]
        index = jnp.asarray(index, jnp.int32)
        valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxT.astype(bool), index, axis=1)
        slots_S = jnp.arange(valid_BxS.shape[1], dtype=jnp.int32)
        query_slots_T = index + jnp.arange(t, dtype=jnp.int32)
        mask = valid_BxS[:, None, :] & (slots_S[None, None, :] <= query_slots_T[None, :, None])
        x, cos, sin = self._embed(input_ids_BxT, positions_BxT)
        new_k, new_v = [], []
        for block, k, v in zip(self.layers, cache.k, cache.v, strict=True):
            x, k, v = block.cached(x, cos, sin, k, v, mask, index)
            x = _constrain(ctx, x, ("batch", "seq", "act_embed"))
            new_k.append(_constrain(ctx, k, _CACHE_AXES))
            new_v.append(_constrain(ctx, v, _CACHE_AXES))
        return self.norm(x), KVCache(tuple(new_k), tuple(new_v), valid_BxS)

    @property
    def explicit_backward(self) -> bool:
        """Whether the backward of every matmul, the LM head's included, is written out (`kt_jax.ops.matmul`)."""
        return explicit_backward_for(self.config.backward_dots)

    def lm_head_kernel(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype (the embedding transposed when tied)."""
        dtype = DTYPES[self.config.dtype]
        if self.config.tie_word_embeddings:
            return self.embed_tokens.get_value().T.astype(dtype)
        return self.lm_head.kernel.get_value().astype(dtype)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Logits [B, T, V] in float32 from hidden states."""
        out = jnp.dot(hidden_BxTxD, self.lm_head_kernel(), preferred_element_type=jnp.float32)
        return _constrain(self.shard_ctx, out, ("batch", "seq", "act_vocab"))

    def __call__(self, input_ids_BxT: jax.Array, *args: jax.Array | None, **kwargs: jax.Array | None) -> jax.Array:
        """Logits [B, T, V] (float32): `logits(hidden_states(...))` with the same arguments."""
        return self.logits(self.hidden_states(input_ids_BxT, *args, **kwargs))
