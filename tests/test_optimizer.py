"""The optimizer keeps its schedule in its state (one compiled step for every rate and length) and matches optax's
AdamW over the same warmup + cosine schedule; the persistent compilation cache's directory choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kt_jax.compile_cache import cache_dir
from kt_jax.train.config import OptimConfig
from kt_jax.train.optimizer import lr_schedule, make_optimizer, schedule_numbers, scheduled_lr

CASES = [
    (OptimConfig(learning_rate=3e-4, warmup_ratio=0.1), 69),
    (OptimConfig(learning_rate=1e-3, warmup_steps=0, end_lr_ratio=0.1), 50),
    (OptimConfig(learning_rate=3e-3, warmup_steps=30, end_lr_ratio=0.1, b2=0.98, weight_decay=0.01), 300),
    (OptimConfig(learning_rate=1e-3), 1),
]


@pytest.mark.parametrize(("cfg", "total"), CASES)
def test_stored_schedule_is_optax_schedule(cfg: OptimConfig, total: int) -> None:
    optax_lr = lr_schedule(cfg, total)
    numbers = jnp.asarray(schedule_numbers(cfg, total), jnp.float32)
    for step in range(total + 3):  # past the end too: the cosine stays at its floor
        assert float(scheduled_lr(jnp.int32(step), numbers)) == pytest.approx(float(optax_lr(step)), rel=1e-5,
                                                                             abs=1e-12)


@pytest.mark.parametrize(("cfg", "total"), CASES)
def test_updates_equal_optax_adamw_with_clipping(cfg: OptimConfig, total: int) -> None:
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3)}
    ref = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                      optax.adamw(lr_schedule(cfg, total), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay))
    ours = make_optimizer(cfg, total)
    ref_state, our_state, p_ref, p_ours = ref.init(params), ours.init(params), params, params
    for i in range(min(total, 12)):
        grads = jax.tree.map(lambda p, i=i: 3.0 * jnp.sin(p * (i + 1)), p_ref)
        u_ref, ref_state = ref.update(grads, ref_state, p_ref)
        u_ours, our_state = ours.update(grads, our_state, p_ours)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
    for k in params:
        np.testing.assert_allclose(np.asarray(p_ours[k]), np.asarray(p_ref[k]), rtol=1e-6, atol=1e-7)


def test_one_compiled_update_serves_every_rate_and_length() -> None:
    params = {"w": jnp.ones((4, 4))}
    traces = []

    @jax.jit
    def update(grads, state, p):
        traces.append(1)
        return make_optimizer(OptimConfig(learning_rate=1.0), 10).update(grads, state, p)

    for lr, total in ((1e-3, 10), (3e-4, 77), (5e-5, 400)):
        tx = make_optimizer(OptimConfig(learning_rate=lr, warmup_steps=0), total)
        state = tx.init(params)
        got, _ = update(params, state, params)  # compiled for lr 1.0 / 10 steps, fed this stage's state
        want, _ = tx.update(params, state, params)
        np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)
    assert len(traces) == 1  # the schedule is data: no retrace (and no recompile) per stage


def test_compile_cache_directory_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KT_JAX_COMPILE_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.setenv("KT_JAX_COMPILE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KT_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kt-jax" / "jax"
