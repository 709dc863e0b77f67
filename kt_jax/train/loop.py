"""The training loop: microbatches from a Grain iterator, bounded in-flight steps, eval + best, checkpoints, resume.

At most `max_in_flight` steps are dispatched but not yet fetched (jax 0.10.2 deadlocks on CPU meshes when many
collective-bearing steps are queued). Before every evaluation / checkpoint all in-flight steps are fetched and
checked, so every saved checkpoint comes after finite steps only; a non-finite loss or gradient norm stops the
run with `TrainingDiverged`, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from kt_jax import sharding
from kt_jax.data.batch import Batch, stack
from kt_jax.errors import KtJaxError
from kt_jax.train.checkpoint import Checkpoints
from kt_jax.train.config import TrainConfig
from kt_jax.train.logging import MetricsLog
from kt_jax.train.state import TrainState


class TrainingDiverged(KtJaxError):
    """The loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    """What a run did: steps, the last metrics, the best evaluation, wall time and tokens."""

    steps: int
    resumed_from: int | None
    last_metrics: dict[str, float]
    best_step: int | None
    best_eval_loss: float | None
    evals: list[dict[str, float]]
    seconds: float
    tokens: float


def stack_micro(batches: Sequence[Batch]) -> Batch:
    """Host batches -> one host batch of [A, B, ...] microbatches (`data.batch.stack`)."""
    return stack(batches)


def to_device(micro: Batch, mesh: Mesh | None) -> Batch:
    """[A, B, ...] host microbatches of this process -> device arrays, B sharded (`sharding.to_device`, axis 1)."""
    return sharding.to_device(micro, mesh, batch_dim=1)


def _host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def evaluate(eval_step: Callable[..., Any], ts: TrainState, batches: Iterable[Batch],
             mesh: Mesh | None, limit: int | None = None) -> dict[str, float]:
    """Mean of each metric over held-out batches (one microbatch each); {} when there are none."""
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        m = _host_metrics(eval_step(ts.params, ts.frozen, to_device(stack_micro([batch]), mesh)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    return {k: v / n for k, v in sums.items()} if n else {}


def train(
    ts: TrainState,
    train_step: Callable[..., Any],
    data: Iterator[Batch],
    *,
    cfg: TrainConfig,
    total_steps: int,
    run_dir: str | Path,
    mesh: Mesh | None = None,
    eval_step: Callable[..., Any] | None = None,
    eval_data: Callable[[], Iterable[Batch]] | None = None,
    lr_fn: Callable[[int], float] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run (or resume) to `total_steps` optimizer steps; checkpoints under `<run_dir>/checkpoints`.

    `data` yields host batches (`data.batch`) and has `get_state`/`set_state` (the Grain iterator);
    `grad_accum` batches make one step. `on_step(step)` is called after each step's metrics are fetched.
    """
    run_dir = Path(run_dir)
    ckpt = Checkpoints(run_dir / "checkpoints", keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
    eval_every = max(1, round(total_steps * cfg.eval_every_frac))
    save_every = cfg.save_every or eval_every
    best_loss, best_step, evals = None, None, []
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        data_state, meta = ckpt.restore(ts)
        if data_state and hasattr(data, "set_state"):
            data.set_state(data_state)
        best_loss, best_step = meta.get("best_eval_loss"), meta.get("best_step")
    log = MetricsLog(run_dir, tensorboard=cfg.tensorboard, resume_step=ts.step)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=ts.step, desc="train", unit="step", dynamic_ncols=True)
    last: dict[str, float] = {}
    last_good = resumed_from
    tokens_total, t_start = 0.0, time.perf_counter()
    # (fetch time, tokens) of recent steps: metrics arrive in bursts of up to max_in_flight steps, so the rate is
    # taken over a window longer than a burst, not between two fetches microseconds apart
    recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=2 * max(cfg.max_in_flight, 1) + 2)
    recent.append((t_start, 0.0))

    def fetch_one(item: tuple[int, Any]) -> None:
        nonlocal last, tokens_total
        step, metrics = item
        m = _host_metrics(metrics)
        if m.get("nonfinite", 0.0) > 0 or not np.isfinite(m.get("loss", 0.0)):
            ckpt.wait()
            where = f"step {last_good} in {ckpt.directory / 'latest'}" if last_good is not None else "none saved yet"
            raise TrainingDiverged(f"non-finite loss ({m.get('loss')}) or grad norm ({m.get('grad_norm')}) at step "
                                   f"{step}; training stopped, last good checkpoint: {where}")
        tokens_total += m.get("tokens", 0.0)
        now = time.perf_counter()
        recent.append((now, m.get("tokens", 0.0)))
        m["tokens_per_s"] = sum(t for _, t in list(recent)[1:]) / max(now - recent[0][0], 1e-9)
        if lr_fn is not None:
            m["lr"] = float(lr_fn(step - 1))
        last = m
        if step % cfg.log_every == 0 or step == total_steps:
            log.write(step, m)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            bar.update(1)
        if on_step is not None:
            on_step(step)

    in_flight = sharding.Throttle(cfg.max_in_flight, fetch_one)
    try:
        while ts.step < total_steps:
            batches = []
            for _ in range(cfg.grad_accum):
                try:
                    batches.append(next(data))
                except StopIteration:
                    break
            if not batches:
                break
            micro = to_device(stack_micro(batches), mesh)
            ts.params, ts.opt_state, metrics = train_step(ts.params, ts.opt_state, ts.frozen, micro)
            ts.step += 1
            in_flight.push((ts.step, metrics))
            is_eval = ts.step % eval_every == 0 or ts.step == total_steps
            if is_eval and eval_step is not None and eval_data is not None:
                in_flight.drain()
                ev = evaluate(eval_step, ts, eval_data(), mesh, cfg.eval_batches)
                if ev:
                    evals.append({"step": ts.step, **ev})
                    log.write(ts.step, ev, prefix="eval")
                    if best_loss is None or ev["loss"] < best_loss:
                        best_loss, best_step = ev["loss"], ts.step
                        ckpt.save_best(ts, {"eval_loss": best_loss})
            if ts.step % save_every == 0 or ts.step == total_steps:
                in_flight.drain()
                state = data.get_state() if hasattr(data, "get_state") else {}
                ckpt.save(ts, state, {"best_eval_loss": best_loss, "best_step": best_step})
                last_good = ts.step
        in_flight.drain()
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        log.close()
        ckpt.close()
    return TrainResult(ts.step, resumed_from, last, best_step, best_loss, evals, time.perf_counter() - t_start,
                       tokens_total)
