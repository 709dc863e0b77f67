"""Pure training losses: masked token-mean cross-entropy (SFT) and the DPO family (TRL 0.7.11 semantics).

KnowTuning's objective (LLaMA-Factory 0.5.3 `CustomDPOTrainer` with `dpo_ftx`, on TRL 0.7.11):
`mean_i[ -log σ(β·Δ_i) + γ·NLL_i ]`, `Δ = (π_c − ρ_c) − (π_r − ρ_r)` over summed response log-probs, `NLL_i` the
token-mean NLL of example i's chosen answer. Every function here is a pure function of arrays (jit/grad safe).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kt_jax.ops.logprobs import masked_sum

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
SFT_REDUCTIONS = ("example", "token")


def masked_mean_nll(logp_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token-mean NLL over all masked tokens of the batch, number of those tokens)."""
    total_B, count_B = masked_sum(logp_BxT, mask_BxT)
    count = jnp.sum(count_B)
    return -jnp.sum(total_B) / jnp.maximum(count, 1.0), count


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    sft_weight: float = 0.0,
    chosen_nll: jax.Array | None = None,
    chosen_tokens: jax.Array | None = None,
    sft_reduction: str = "example",
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO loss over [B] summed log-probs -> (scalar loss, metrics); TRL 0.7.11 `dpo_loss` + LLaMA-Factory ftx.

    `chosen_nll` [B] is the per-example token-mean NLL of the chosen answer; `sft_weight` = γ adds
    γ·chosen_nll per example (LLaMA-Factory's `dpo_ftx`). `sft_reduction="token"` instead adds γ times the
    batch token-mean NLL (needs `chosen_tokens` [B]), as TRL's later `sft` term does. `weights` [B] (0/1) drops
    padding rows from every mean. Rewards are β·(policy − reference) as in TRL, also when `reference_free`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {LOSS_TYPES}")
    if sft_reduction not in SFT_REDUCTIONS:
        raise ValueError(f"sft_reduction={sft_reduction!r}; choose one of {SFT_REDUCTIONS}")
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0.0 if reference_free else ref_chosen_logps - ref_rejected_logps
    logits = pi_logratios - ref_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * logits) * (1 - eps) - jax.nn.log_sigmoid(-beta * logits) * eps
    elif loss_type == "robust":
        losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - eps) + jax.nn.log_sigmoid(-beta * logits) * eps) / (
            1 - 2 * eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    w = jnp.ones_like(losses) if weights is None else weights.astype(losses.dtype)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = lambda x: jnp.sum(w * x) / n
    loss = mean(losses)
    metrics: dict[str, jax.Array] = {"loss/dpo": loss}
    if sft_weight:
        if chosen_nll is None:
            raise ValueError("sft_weight > 0 needs chosen_nll (per-example token-mean NLL of the chosen answer)")
        if sft_reduction == "example":
            sft = mean(chosen_nll)
        else:
            if chosen_tokens is None:
                raise ValueError("sft_reduction='token' needs chosen_tokens")
            tok = w * chosen_tokens
            sft = jnp.sum(tok * chosen_nll) / jnp.maximum(jnp.sum(tok), 1.0)
        loss = loss + sft_weight * sft
        metrics["loss/sft"] = sft
    chosen_rewards = beta * jax.lax.stop_gradient(policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * jax.lax.stop_gradient(policy_rejected_logps - ref_rejected_logps)
    metrics.update({
        "loss": loss,
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracy": mean((chosen_rewards > rejected_rewards).astype(losses.dtype)),
        "rewards/margin": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(jax.lax.stop_gradient(policy_chosen_logps)),
        "logps/rejected": mean(jax.lax.stop_gradient(policy_rejected_logps)),
    })
    return loss, metrics
