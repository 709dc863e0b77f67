"""Model-level losses (SFT/LM, DPO) and jitted train/eval steps over microbatches, with a NaN/Inf guard.

A step takes the trained params (pure dict), optimizer state, frozen state and a batch (`data.batch.SeqBatch`,
`PreferenceBatch` or `GroupedPreferenceBatch`) whose arrays have a leading microbatch axis [A, B, ...]; it averages
the A microbatch losses/gradients (as HF Trainer does with gradient accumulation), clips, applies AdamW, and returns
metrics.
When the loss or the gradient norm is not finite the update is skipped (params and optimizer state returned
unchanged) and `nonfinite` = 1 is reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kt_jax.data.batch import Batch, GroupedPreferenceBatch, PreferenceBatch, SeqBatch, SharedPrefixBatch
from kt_jax.model.attention import shared_prefix_mask
from kt_jax.ops.logprobs import DEFAULT_CHUNK, masked_sum, token_logprobs
from kt_jax.ops.losses import dpo_loss, masked_mean_nll
from kt_jax.train.config import DPOConfig
from kt_jax.train.state import TrainState, merge_params

LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def batch_logprobs(model: Any, batch: SeqBatch, *, chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
    """[B, T] float32 log-probs of `batch.targets` under `model` where `loss_mask` counts (0 elsewhere; packed
    segments attend within themselves): the LM head runs only on sequence chunks holding counted targets."""
    hidden_BxTxD = model.hidden_states(batch.input_ids, batch.positions, batch.segment_ids)
    return token_logprobs(hidden_BxTxD, model.lm_head_kernel(), batch.targets, chunk_size=chunk_size,
                          where_BxT=batch.loss_mask, explicit_backward=model.explicit_backward)


def grouped_logprobs(model: Any, seq: SeqBatch, group_ids_BxT: jax.Array, *, chunk_size: int = DEFAULT_CHUNK
                     ) -> jax.Array:
    """[B, T] float32 target log-probs of rows whose segments share their group's prefix (`packing.Group`)."""
    allowed_BxTxT = shared_prefix_mask(seq.segment_ids, group_ids_BxT)
    hidden_BxTxD = model.hidden_states(seq.input_ids, seq.positions, None, allowed_BxTxT)
    return token_logprobs(hidden_BxTxD, model.lm_head_kernel(), seq.targets, chunk_size=chunk_size,
                          where_BxT=seq.loss_mask, explicit_backward=model.explicit_backward)


def sft_loss(model: Any, batch: SeqBatch | SharedPrefixBatch, *, chunk_size: int = DEFAULT_CHUNK
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked token-mean cross-entropy of an SFT/LM batch (loss_mask selects the counted targets)."""
    if isinstance(batch, SharedPrefixBatch):
        seq, logp_BxT = batch.seq, grouped_logprobs(model, batch.seq, batch.group_ids, chunk_size=chunk_size)
    else:
        seq, logp_BxT = batch, batch_logprobs(model, batch, chunk_size=chunk_size)
    loss, tokens = masked_mean_nll(logp_BxT, seq.loss_mask)
    return loss, {"loss": loss, "tokens": tokens}


def make_sft_loss(chunk_size: int = 128) -> LossFn:
    """Masked token-mean CE of an SFT batch."""
    return functools.partial(sft_loss, chunk_size=chunk_size)


def dpo_policy_logps(model: Any, batch: PreferenceBatch, chunk_size: int = 128
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(chosen summed logps, rejected summed logps, chosen token counts, rejected counts), one forward."""
    b = batch.chosen.input_ids.shape[0]
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r], axis=0), batch.chosen, batch.rejected)
    logp_2BxT = batch_logprobs(model, both, chunk_size=chunk_size)
    sums, counts = masked_sum(logp_2BxT, both.loss_mask)
    return sums[:b], sums[b:], counts[:b], counts[b:]


def grouped_policy_logps(model: Any, batch: GroupedPreferenceBatch, chunk_size: int = 128
                         ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per pair slot [B, K]: (chosen summed logps, rejected summed logps, chosen counts, rejected counts).

    One forward over the grouped rows: attention inside a group, each answer seeing the shared prompt (segment 0)
    and itself, exactly the keys its own unpacked sequence has; a pair's sums are its two segments' sums.
    """
    seq = batch.seq
    seg = seq.segment_ids
    logp_BxT = grouped_logprobs(model, seq, batch.group_ids, chunk_size=chunk_size)
    mask_BxT = seq.loss_mask.astype(jnp.float32)

    def side(seg_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
        sel_BxKxT = (seg[:, None, :] == seg_BxK[:, :, None]) & (seg_BxK[:, :, None] > 0) & (mask_BxT[:, None, :] > 0)
        total = jnp.sum(jnp.where(sel_BxKxT, logp_BxT[:, None, :] * mask_BxT[:, None, :], 0.0), axis=-1)
        return total, jnp.sum(jnp.where(sel_BxKxT, mask_BxT[:, None, :], 0.0), axis=-1)

    (pc, nc), (pr, nr) = side(batch.chosen_seg), side(batch.rejected_seg)
    return pc, pr, nc, nr


def preference_logps(model: Any, batch: PreferenceBatch | GroupedPreferenceBatch, chunk_size: int = 128
                     ) -> tuple[jax.Array, ...]:
    """(policy chosen, policy rejected, chosen counts, rejected counts, ref chosen, ref rejected), one per pair [N]."""
    if isinstance(batch, GroupedPreferenceBatch):
        out = (*grouped_policy_logps(model, batch, chunk_size), batch.ref_chosen_logps, batch.ref_rejected_logps)
        return tuple(x.reshape(-1) for x in out)
    return (*dpo_policy_logps(model, batch, chunk_size), batch.ref_chosen_logps, batch.ref_rejected_logps)


def make_dpo_loss(cfg: DPOConfig, chunk_size: int = 128) -> LossFn:
    """DPO (+ the chosen NLL term) of a (grouped) preference batch with stored reference log-probs; pads weigh 0.

    Every pair counts once in every mean, whether it came as two rows or as two segments of a grouped row.
    """

    def loss_fn(model: Any, batch: PreferenceBatch | GroupedPreferenceBatch) -> tuple[jax.Array, dict[str, jax.Array]]:
        pc, pr, nc, nr, rc, rr = preference_logps(model, batch, chunk_size)
        weights = ((nc > 0) & (nr > 0)).astype(jnp.float32)
        loss, metrics = dpo_loss(
            pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing, reference_free=cfg.reference_free, sft_weight=cfg.sft_weight,
            chosen_nll=-pc / jnp.maximum(nc, 1.0), chosen_tokens=nc, sft_reduction=cfg.sft_reduction,
            weights=weights)
        return loss, metrics

    return loss_fn


def _token_count(batch: Batch) -> jax.Array:
    """Non-padding input tokens in a batch (both sides of a preference batch; a shared prompt once)."""
    if isinstance(batch, GroupedPreferenceBatch | SharedPrefixBatch):
        return jnp.sum(batch.group_ids > 0).astype(jnp.float32)
    seqs = (batch.chosen, batch.rejected) if isinstance(batch, PreferenceBatch) else (batch,)
    return sum(jnp.sum(s.segment_ids > 0) for s in seqs).astype(jnp.float32)


def _accumulate(loss_fn: LossFn, ts: TrainState, params: Any, frozen: Any, micro: Batch, grads: bool):
    """Mean loss / metrics (and grads) over the leading microbatch axis."""

    def one(p: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, metrics = loss_fn(merge_params(ts.graphdef, ts.template, p, frozen), batch)
        return loss, metrics

    fn = jax.value_and_grad(one, has_aux=True) if grads else one
    a = jax.tree.leaves(micro)[0].shape[0]

    def body(carry: Any, batch: Batch) -> tuple[Any, None]:
        out = fn(params, batch)
        (_, metrics), g = (out if grads else (out, None))
        metrics = {**metrics, "tokens": _token_count(batch)}
        new = jax.tree.map(jnp.add, carry, (metrics, g)) if carry is not None else (metrics, g)
        return new, None

    first = jax.tree.map(lambda x: x[0], micro)
    carry, _ = body(None, first)
    if a > 1:
        rest = jax.tree.map(lambda x: x[1:], micro)
        carry, _ = jax.lax.scan(body, carry, rest)
    metrics, g = carry
    tokens = metrics.pop("tokens")
    metrics = jax.tree.map(lambda x: x / a, metrics)
    metrics["tokens"] = tokens
    return metrics, (None if g is None else jax.tree.map(lambda x: x / a, g))


def make_train_step(ts: TrainState, tx: optax.GradientTransformation, loss_fn: LossFn) -> Callable[..., Any]:
    """jit(params, opt_state, frozen, micro) -> (params, opt_state, metrics); params/opt_state donated."""

    def step(params: Any, opt_state: Any, frozen: Any, micro: Batch) -> Any:
        metrics, grads = _accumulate(loss_fn, ts, params, frozen, micro, grads=True)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {**metrics, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    kwargs: dict[str, Any] = {"donate_argnums": (0, 1)}
    if ts.param_shardings is not None:
        kwargs["out_shardings"] = (ts.param_shardings, ts.opt_shardings, None)
    return jax.jit(step, **kwargs)


def make_eval_step(ts: TrainState, loss_fn: LossFn) -> Callable[..., Any]:
    """jit(params, frozen, micro) -> metrics (means over the microbatch axis)."""

    def step(params: Any, frozen: Any, micro: Batch) -> dict[str, jax.Array]:
        metrics, _ = _accumulate(loss_fn, ts, params, frozen, micro, grads=False)
        return metrics

    return jax.jit(step)
