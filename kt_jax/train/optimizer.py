"""optax AdamW with linear warmup + cosine decay and global-norm clipping (HF Trainer defaults of the original)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


class ScheduleState(NamedTuple):
    """Steps taken and the schedule's numbers (init, peak, warmup, decay steps, end) as arrays."""

    count: jax.Array
    schedule: jax.Array


def schedule_numbers(cfg: OptimConfig, total_steps: int) -> tuple[float, float, float, float, float]:
    """(init, peak, warmup, decay steps, end) of `lr_schedule(cfg, total_steps)`."""
    warm = min(warmup_steps(cfg, total_steps), max(total_steps - 1, 0))
    return (0.0 if warm else cfg.learning_rate, cfg.learning_rate, float(warm), float(max(total_steps, warm + 1)),
            cfg.learning_rate * cfg.end_lr_ratio)


def scheduled_lr(count: jax.Array, numbers: jax.Array) -> jax.Array:
    """`lr_schedule`'s value at `count`, computed from `schedule_numbers` held as an array."""
    init, peak, warm, decay, end = (numbers[i] for i in range(5))
    c = count.astype(jnp.float32)
    rising = init + (peak - init) * jnp.minimum(c, warm) / jnp.maximum(warm, 1.0)
    t = jnp.clip(c - warm, 0.0, decay - warm) / jnp.maximum(decay - warm, 1.0)
    falling = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(c < warm, rising, falling)


def scale_by_stored_schedule(numbers: tuple[float, ...]) -> optax.GradientTransformation:
    """updates * -lr(step), the schedule's numbers kept in the optimizer state rather than in the program.

    optax's schedules are Python closures, so their numbers (rate, warmup, length) become constants of the compiled
    train step and every stage, search candidate and seed compiles its own. As state they are inputs: one compiled
    step serves them all (`kt_jax.compile_cache`).
    """

    def init(params: Any) -> ScheduleState:
        del params
        return ScheduleState(jnp.zeros([], jnp.int32), jnp.asarray(numbers, jnp.float32))

    def update(updates: Any, state: ScheduleState, params: Any = None) -> tuple[Any, ScheduleState]:
        del params
        lr = scheduled_lr(state.count, state.schedule)
        updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
        return updates, ScheduleState(optax.safe_int32_increment(state.count), state.schedule)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) then AdamW (decoupled weight decay scaled by the rate, as optax.adamw and
    torch's AdamW do) with the schedule above held in the optimizer state."""
    cfg.validate()
    adamw = optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                        optax.add_decayed_weights(cfg.weight_decay),
                        scale_by_stored_schedule(schedule_numbers(cfg, total_steps)))
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
