"""Target-token log-probs without materialising a float32 [B, T, V] log-softmax, and masked sums (arrays only).

Scoring (fact perplexities, DPO reference log-probs) and training losses (SFT, DPO) all go through
`token_logprobs`, so a perplexity and a loss computed on the same tokens can never disagree.

Memory: logits exist one sequence chunk at a time ([B, chunk, V] float32). The chunk function is wrapped in
`jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of storing all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128  # sequence positions per chunk: [B, 128, V] float32 logits live at a time


def _chunk_logprobs(hidden_BxCxD: jax.Array, lm_head_DxV: jax.Array, targets_BxC: jax.Array) -> jax.Array:
    """log softmax(h @ W)[target] for one chunk, in float32."""
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, lm_head_DxV, preferred_element_type=jnp.float32)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_BxC - lse_BxC


def token_logprobs(
    hidden_BxTxD: jax.Array, lm_head_DxV: jax.Array, targets_BxT: jax.Array, *, chunk_size: int = DEFAULT_CHUNK
) -> jax.Array:
    """log p(targets[b, t] | hidden[b, t]) as float32 [B, T], computed chunk by chunk over the sequence.

    Works under jit and grad (w.r.t. hidden and lm_head). Targets must lie in [0, V); positions without a
    real target should hold any valid id (e.g. 0) and be masked by the caller.
    """
    b, t, d = hidden_BxTxD.shape
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if t <= chunk_size:
        return _chunk_logprobs(hidden_BxTxD, lm_head_DxV, targets_BxT)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    # [B, n*C, D] -> [n, B, C, D]: the batch axis (and its sharding) stays intact inside every chunk
    hidden_NxBxCxD = hidden_BxTxD.reshape(b, n, chunk_size, d).transpose(1, 0, 2, 3)
    targets_NxBxC = targets_BxT.reshape(b, n, chunk_size).transpose(1, 0, 2)
    step = jax.checkpoint(lambda xs: _chunk_logprobs(xs[0], lm_head_DxV, xs[1]))
    logp_NxBxC = jax.lax.map(step, (hidden_NxBxCxD, targets_NxBxC))
    return logp_NxBxC.transpose(1, 0, 2).reshape(b, n * chunk_size)[:, :t]


def masked_sum(logp_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over t of logp where mask, number of masked-in tokens), both float32 [B]."""
    mask = mask_BxT.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask > 0, logp_BxT * mask, 0.0), axis=1)
    return total_B, jnp.sum(mask, axis=1)
