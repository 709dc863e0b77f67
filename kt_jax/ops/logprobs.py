"""Target-token log-probs without materialising a float32 [B, T, V] log-softmax, and masked sums (arrays only).

Scoring (fact perplexities, DPO reference log-probs) and training losses (SFT, DPO) all go through
`token_logprobs`, so a perplexity and a loss computed on the same tokens can never disagree.

Memory: logits exist one sequence chunk at a time ([B, chunk, V] float32). When all of a batch's logits would take
more than `STORED_LOGITS_BYTES`, the chunk function is wrapped in `jax.checkpoint`, so the backward pass recomputes
each chunk's logits instead of storing all of them (a 7-8B Llama's vocabulary at any real batch); below it the
backward keeps them and skips a second LM-head forward (3-4% of a 42M model's SFT step on CPU, measured).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kt_jax.ops.matmul import matmul

DEFAULT_CHUNK = 128  # sequence positions per chunk: [B, 128, V] float32 logits live at a time
STORED_LOGITS_BYTES = 256 << 20  # the backward keeps a batch's float32 logits up to this size, recomputes above it


def _chunk_logprobs(hidden_BxCxD: jax.Array, lm_head_DxV: jax.Array, targets_BxC: jax.Array, explicit_backward: bool
                    ) -> jax.Array:
    """log softmax(h @ W)[target] for one chunk, in float32."""
    logits_BxCxV = matmul(hidden_BxCxD, lm_head_DxV, explicit_backward=explicit_backward, out_dtype=jnp.float32)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_BxC - lse_BxC


def token_logprobs(
    hidden_BxTxD: jax.Array, lm_head_DxV: jax.Array, targets_BxT: jax.Array, *, chunk_size: int = DEFAULT_CHUNK,
    where_BxT: jax.Array | None = None, explicit_backward: bool = False,
) -> jax.Array:
    """log p(targets[b, t] | hidden[b, t]) as float32 [B, T], computed chunk by chunk over the sequence.

    Works under jit and grad (w.r.t. hidden and lm_head). Targets must lie in [0, V); positions without a
    real target should hold any valid id (e.g. 0) and be masked by the caller. With `where_BxT`, only the
    positions where it is > 0 are computed (the others are 0): `_sparse_logprobs` skips the rest of the LM head.
    `explicit_backward` writes the LM head's backward out (`kt_jax.ops.matmul`; training passes the model's).
    """
    b, t = hidden_BxTxD.shape[:2]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if t <= chunk_size:  # one chunk: nothing to skip, and no sort or gather to pay for
        logp_BxT = _chunk_logprobs(hidden_BxTxD, lm_head_DxV, targets_BxT, explicit_backward)
        return logp_BxT if where_BxT is None else jnp.where(where_BxT > 0, logp_BxT, 0.0)
    if where_BxT is not None:
        return _sparse_logprobs(hidden_BxTxD, lm_head_DxV, targets_BxT, where_BxT > 0, chunk_size, explicit_backward)
    n = -(-t // chunk_size)
    hidden_NxBxCxD, targets_NxBxC = _to_chunks(hidden_BxTxD, n, chunk_size), _to_chunks(targets_BxT, n, chunk_size)
    step = _recomputed(lambda xs: _chunk_logprobs(xs[0], lm_head_DxV, xs[1], explicit_backward), b * t, lm_head_DxV)
    logp_NxBxC = jax.lax.map(step, (hidden_NxBxCxD, targets_NxBxC))
    return logp_NxBxC.transpose(1, 0, 2).reshape(b, n * chunk_size)[:, :t]


def _recomputed(step: Callable[[Any], jax.Array], positions: int, lm_head_DxV: jax.Array) -> Callable[[Any], jax.Array]:
    """`step` under `jax.checkpoint` when `positions` float32 logits over the vocabulary exceed STORED_LOGITS_BYTES."""
    return jax.checkpoint(step) if positions * lm_head_DxV.shape[-1] * 4 > STORED_LOGITS_BYTES else step


def _to_chunks(x_BxT: jax.Array, n: int, chunk_size: int) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], zero-padded: the batch axis (and its sharding) stays intact in a chunk."""
    b, t = x_BxT.shape[:2]
    pad = n * chunk_size - t
    if pad:
        x_BxT = jnp.pad(x_BxT, ((0, 0), (0, pad)) + ((0, 0),) * (x_BxT.ndim - 2))
    x = x_BxT.reshape(b, n, chunk_size, *x_BxT.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _sparse_logprobs(hidden_BxTxD: jax.Array, lm_head_DxV: jax.Array, targets_BxT: jax.Array, keep_BxT: jax.Array,
                     chunk_size: int, explicit_backward: bool) -> jax.Array:
    """Target log-probs at the kept positions (0 elsewhere), the LM head skipped where nothing is kept.

    Each row's kept positions move to its front (a stable per-row sort: the batch axis and its sharding stay
    intact), and a chunk in which no row keeps a position is skipped, forward and backward. SFT rows whose
    responses are a quarter of their tokens run the LM head on about a quarter of the chunks; a dense mask
    (language modelling) runs all of them, and pays only the sort and two gathers.
    """
    b, t, _ = hidden_BxTxD.shape
    n = -(-t // chunk_size)
    order_BxT = jnp.argsort(~keep_BxT, axis=1, stable=True)
    gathered = (jnp.take_along_axis(hidden_BxTxD, order_BxT[..., None], axis=1),
                jnp.take_along_axis(targets_BxT, order_BxT, axis=1),
                jnp.take_along_axis(keep_BxT, order_BxT, axis=1))
    chunks = tuple(_to_chunks(x, n, chunk_size) for x in gathered)

    def compute(xs: tuple[jax.Array, ...]) -> jax.Array:
        return jnp.where(xs[2], _chunk_logprobs(xs[0], lm_head_DxV, xs[1], explicit_backward), 0.0)

    def step(xs: tuple[jax.Array, ...]) -> jax.Array:
        return jax.lax.cond(jnp.any(xs[2]), compute, lambda x: jnp.zeros(x[2].shape, jnp.float32), xs)

    logp_NxBxC = jax.lax.map(_recomputed(step, b * t, lm_head_DxV), chunks)
    sorted_BxT = jnp.moveaxis(logp_NxBxC, 0, 1).reshape(b, n * chunk_size)[:, :t]
    return jnp.take_along_axis(sorted_BxT, jnp.argsort(order_BxT, axis=1), axis=1)


def masked_sum(logp_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over t of logp where mask, number of masked-in tokens), both float32 [B]."""
    mask = mask_BxT.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask > 0, logp_BxT * mask, 0.0), axis=1)
    return total_B, jnp.sum(mask, axis=1)
