"""Causal self-attention over packed segments, one function with backends chosen by config.

Backends (`LlamaConfig.attention`):
- `xla`: a dense boolean [B, T, T] mask (causal, same segment, optional extra mask) and a float32-logit softmax.
  The default; every other backend is tested against it.
- `splash`: the Pallas TPU splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) with a causal
  mask per head and the packed segment ids, inside `shard_map` over the mesh's batch axes (heads over `tensor`
  when both query and key/value heads divide). Queries are pre-scaled by 1/sqrt(D); the sequence is padded to a
  multiple of 128 (the kernel's lane width) and cut back. Off TPU it runs in Pallas interpret mode (slow; tests).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only. That API has no segment-id argument,
  so packing is expressed as a boolean [B, 1, T, T] same-segment mask (cuDNN turns it into a dense bias) with
  `is_causal=True`.
- `auto`: splash on TPU, cudnn on GPU, xla elsewhere.

Three cases fall back to `xla` whatever the backend: an extra mask (grouped preference rows let every answer
attend to its prompt but not to the other answers packed after it; segment ids cannot say that), attention
windows (`AttentionWindows`: prefix-shared fact scoring), and the KV-cache path used by sampling (queries against a
cache of a different length with a validity mask).

Attention windows: a packed row's attention is computed inside windows of its positions instead of over the
whole row: each window gathers its queries and keys, and attends with its own [Q, S] mask. A row of many short
groups (fact scoring: a question and its facts) costs the sum of its windows' Q x S score blocks instead of T x T:
on CPU the softmax over masked-out scores cost more time than the whole model's matmuls (`docs/DESIGN.md`).
Segment ids are compared for equality only: padding (segment 0) attends to padding, as in the xla mask; mask
padded positions in the loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from kt_jax.errors import ConfigError
from kt_jax.sharding import RULES, ShardingRules

BACKENDS = ("xla", "splash", "cudnn", "auto")
SPLASH_LANES = 128  # splash block sizes must be multiples of this


def resolve_backend(name: str, platform: str | None = None) -> str:
    """The concrete backend for `name` on `platform` (default: JAX's default backend); checks availability."""
    if name not in BACKENDS:
        raise ConfigError(f"attention={name!r}; choose one of {', '.join(BACKENDS)}")
    platform = platform or jax.default_backend()
    if name == "auto":
        return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")
    if name == "cudnn" and platform not in ("gpu", "cuda"):
        raise ConfigError(f"attention='cudnn' needs an NVIDIA GPU, but JAX runs on {platform!r}; use xla or auto")
    return name


def attention_mask(
    segment_ids_BxT: jax.Array | None, extra_mask_BxTxS: jax.Array | None, batch: int, length: int
) -> jax.Array:
    """Boolean [B, T, T]: causal, within the same segment, and within `extra_mask` when given."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (batch, length, length))
    if segment_ids_BxT is not None:
        mask = mask & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
    if extra_mask_BxTxS is not None:
        mask = mask & extra_mask_BxTxS.astype(bool)
    return mask


def shared_prefix_mask(segment_ids_BxT: jax.Array, group_ids_BxT: jax.Array) -> jax.Array:
    """Boolean [B, T, T] keys each query may see (before causality) in rows of groups that share a prefix
    (`data.packing.Group`): its group's prefix (segment 0) and its own segment; padding (group 0) sees padding."""
    seg, group = segment_ids_BxT, group_ids_BxT
    return (group[:, :, None] == group[:, None, :]) & ((seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0))


def dot_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_BxTxS: jax.Array, *,
                  kv_layout: str = "bskd") -> jax.Array:
    """Grouped-query softmax attention in float32 logits; returns [B, T, H, D] in the query dtype.

    Keys and values are [B, S, K, D] (`kv_layout="bskd"`) or head-major [B, K, S, D] (`"bksd"`: the KV cache's layout,
    which the two dots read without a copy; a slot-major cache was transposed whole in every decode step).
    """
    b, t, h, d = q_BxTxHxD.shape
    kv = k_BxSxKxD.shape[kv_layout.index("k")]
    q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(d))
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs, v_BxSxKxD)
    return out_BxTxKxGxD.reshape(b, t, h, d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionWindows:
    """Where attention runs in each row of [B, T]: W windows of Q query slots and S key slots.

    Every position of a row that needs an output is the query of exactly one window slot; padding slots point at
    any position and are masked out. `allowed` carries the whole mask (causality included), so a window can share
    keys with others (a prompt preamble every window sees) without any order between them.
    """

    query_idx: Any  # [B, W, Q] row position of each query slot
    key_idx: Any  # [B, W, S] row position of each key slot
    allowed: Any  # [B, W, Q, S] bool: the query slot attends to the key slot
    slot_idx: Any  # [B, T] the query slot (w * Q + q) holding each row position; positions in no window: any slot


def windowed_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array,
                       windows: AttentionWindows) -> jax.Array:
    """Attention [B, T, H, D] computed window by window (`AttentionWindows`); rows stay on their own device.

    Head-major throughout (one transpose of q/k/v and of the output), so the two batched dots contract without
    copies, and the softmax is normalised after the value dot (one pass less over the [Q, S] scores): 10-30%
    faster on CPU than `dot_attention` on gathered windows, equal to float32 rounding.
    """
    b, _, h, d = q_BxTxHxD.shape
    kv = k_BxTxKxD.shape[2]
    _, w, nq = windows.query_idx.shape
    ns = windows.key_idx.shape[2]

    def take(x_BxHxTxD: jax.Array, idx: jax.Array) -> jax.Array:
        return jnp.take_along_axis(x_BxHxTxD, idx.reshape(b, 1, -1, 1), axis=2)

    q_BxHxTxD, k_BxKxTxD, v_BxKxTxD = (x.transpose(0, 2, 1, 3) for x in (q_BxTxHxD, k_BxTxKxD, v_BxTxKxD))
    q = take(q_BxHxTxD, windows.query_idx).reshape(b, kv, h // kv, w, nq, d)
    k = take(k_BxKxTxD, windows.key_idx).reshape(b, kv, w, ns, d)
    v = take(v_BxKxTxD, windows.key_idx).reshape(b, kv, w, ns, d)
    scores = jnp.einsum("bkgwqd,bkwsd->bkgwqs", q, k, preferred_element_type=jnp.float32) * (1.0 / np.sqrt(d))
    scores = jnp.where(windows.allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("bkgwqs,bkwsd->bkgwqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q_BxTxHxD.dtype)
    return take(out.reshape(b, h, w * nq, d), windows.slot_idx).transpose(0, 2, 1, 3)


def _splash_kernel(heads: int, length: int, interpret: bool) -> tuple[Any, Any]:
    """(causal splash kernel for `heads` heads of `length` tokens, the kernel module for its SegmentIds)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = max(b for b in (512, 256, 128) if length % b == 0)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret), sk


def _splash_local(
    q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array, interpret: bool
) -> jax.Array:
    """Splash on one device's shard: pad T to the lane width, run the kernel per row, cut the padding."""
    _, t, h, d = q_BxTxHxD.shape
    padded = -(-t // SPLASH_LANES) * SPLASH_LANES
    kernel, sk = _splash_kernel(h, padded, interpret)
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    # Heads first for the kernel; pre-scaled queries (the kernel applies no 1/sqrt(D)).
    q = jnp.pad(q_BxTxHxD * jnp.asarray(1.0 / math.sqrt(d), q_BxTxHxD.dtype), pad).transpose(0, 2, 1, 3)
    k = jnp.pad(k_BxTxKxD, pad).transpose(0, 2, 1, 3)
    v = jnp.pad(v_BxTxKxD, pad).transpose(0, 2, 1, 3)
    # Padded positions come after every real one, so causality alone keeps real queries off them.
    seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, padded - t)), constant_values=-1)
    out_BxHxTxD = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
        q, k, v, seg
    )
    return out_BxHxTxD.transpose(0, 2, 1, 3)[:, :t].astype(q_BxTxHxD.dtype)


def _mesh_axes(mesh: Mesh, rules: ShardingRules, logical: str, size: int) -> tuple[str, ...] | None:
    """The mesh axes `logical` maps to (size > 1 ones), or None when they do not divide `size`."""
    axes = rules.mesh_axes(logical)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if axes and size % n == 0 else None


def splash_attention(
    q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array | None,
    mesh: Mesh | None = None, rules: ShardingRules = RULES, interpret: bool | None = None,
) -> jax.Array:
    """Causal packed-segment attention [B, T, H, D] with the splash kernel (interpret mode off TPU by default)."""
    b, t, h, _ = q_BxTxHxD.shape
    kv = k_BxTxKxD.shape[2]
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.zeros((b, t), jnp.int32)
    if interpret is None:
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        interpret = platform != "tpu"
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
    batch_axes = _mesh_axes(mesh, rules, "batch", b)
    head_axes = _mesh_axes(mesh, rules, "act_heads", h)
    if head_axes is not None and _mesh_axes(mesh, rules, "act_heads", kv) != head_axes:
        head_axes = None  # key/value heads do not split the same way: keep heads whole
    qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(batch_axes, None)),
        out_specs=qkv_spec, check_vma=False,
    )
    return sharded(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)


def cudnn_attention(
    q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array, segment_ids_BxT: jax.Array | None
) -> jax.Array:
    """Causal packed-segment attention [B, T, H, D] through cuDNN (segments as a boolean same-segment mask)."""
    mask = None
    if segment_ids_BxT is not None:
        mask = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask=mask, is_causal=True, implementation="cudnn"
    ).astype(q_BxTxHxD.dtype)


def attention(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    extra_mask_BxTxT: jax.Array | None = None,
    backend: str = "xla",
    mesh: Mesh | None = None,
    rules: ShardingRules = RULES,
    windows: AttentionWindows | None = None,
) -> jax.Array:
    """Causal self-attention [B, T, H, D] within equal segment ids (and `extra_mask`), by `backend`; or, with
    `windows`, exactly what the windows allow (segment ids and extra mask unused).

    An extra mask or windows always take the xla path (see the module docstring).
    """
    if windows is not None:
        return windowed_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, windows)
    platform = mesh.devices.flat[0].platform if mesh is not None else None
    backend = resolve_backend(backend, platform)
    if backend == "splash" and extra_mask_BxTxT is None:
        return splash_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT, mesh, rules)
    if backend == "cudnn" and extra_mask_BxTxT is None:
        return cudnn_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, segment_ids_BxT)
    b, t = q_BxTxHxD.shape[:2]
    return dot_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, attention_mask(segment_ids_BxT, extra_mask_BxTxT, b, t))
