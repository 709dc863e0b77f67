"""optax AdamW with linear warmup + cosine decay and global-norm clipping (HF Trainer defaults of the original)."""

from __future__ import annotations

import math

import optax

from kt_jax.train.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length: `warmup_steps` when set, else ceil(warmup_ratio · total) as HF Trainer does."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup, then cosine to end_lr_ratio·lr at `total_steps`."""
    warm = min(warmup_steps(cfg, total_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else cfg.learning_rate, peak_value=cfg.learning_rate, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1), end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) then AdamW with the schedule above."""
    cfg.validate()
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
