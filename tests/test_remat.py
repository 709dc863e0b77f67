"""Rematerialisation through the real train step and scoring: same gradients and scores as without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_steps import pref_batch, sft_batch

from kt_jax.model.hf import load_pretrained
from kt_jax.model.lora import LoRAConfig, apply_lora
from kt_jax.train.config import DPOConfig
from kt_jax.train.loop import stack_micro, to_device
from kt_jax.train.state import create_state
from kt_jax.train.steps import make_dpo_loss, make_sft_loss, make_train_step

pytestmark = pytest.mark.timeout(300)


def _grads_via_step(path, task: str, lora: bool, remat: bool, micro, mesh=None, dtype=jnp.float32):
    """-(update) of one SGD(lr=1) step through make_train_step, i.e. the accumulated gradient, and the loss."""
    model = load_pretrained(path, mesh=mesh, remat=remat, dtype=dtype, param_dtype=jnp.float32)
    assert model.config.remat is remat
    if lora:
        # B random (not zero) so the LoRA A matrices get gradient too
        apply_lora(model, LoRAConfig(targets=("q_proj", "v_proj"), rank=4, alpha=8.0), seed=3)
        for path_, var in jax.tree_util.tree_leaves_with_path(model, is_leaf=lambda x: hasattr(x, "get_value")):
            if "lora_b" in jax.tree_util.keystr(path_):
                var.set_value(0.05 * jax.random.normal(jax.random.key(7), var.get_value().shape))
    tx = optax.sgd(1.0)
    ts = create_state(model, tx, mesh)
    loss_fn = make_sft_loss(chunk_size=8) if task == "sft" else make_dpo_loss(DPOConfig(), chunk_size=8)
    before = jax.tree.map(np.asarray, ts.params)
    new, _, metrics = make_train_step(ts, tx, loss_fn)(ts.params, ts.opt_state, ts.frozen, to_device(micro, mesh))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, new)
    return grads, float(metrics["loss"])


def _micro(task: str, rows: int = 8):
    rng = np.random.default_rng(11)
    make = (lambda: sft_batch(rng, rows, 24)) if task == "sft" else (lambda: pref_batch(rng, rows, 24))
    return stack_micro([make(), make()])  # two microbatches: the gradient-accumulation scan


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_remat_gradients_equal_through_train_step(llama2_dir, task, lora) -> None:
    micro = _micro(task)
    g0, l0 = _grads_via_step(llama2_dir, task, lora, remat=False, micro=micro)
    g1, l1 = _grads_via_step(llama2_dir, task, lora, remat=True, micro=micro)
    assert l1 == pytest.approx(l0, abs=1e-6)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-4  # a real gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), g0, g1)


def test_remat_lora_dpo_on_meshes(llama2_dir, mesh) -> None:
    micro = _micro("dpo")
    g0, l0 = _grads_via_step(llama2_dir, "dpo", True, remat=False, micro=micro, mesh=mesh)
    g1, l1 = _grads_via_step(llama2_dir, "dpo", True, remat=True, micro=micro, mesh=mesh)
    assert l1 == pytest.approx(l0, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), g0, g1)


def test_remat_bf16_compute_lora_sft(llama2_dir) -> None:
    micro = _micro("sft")
    g0, l0 = _grads_via_step(llama2_dir, "sft", True, remat=False, micro=micro, dtype=jnp.bfloat16)
    g1, l1 = _grads_via_step(llama2_dir, "sft", True, remat=True, micro=micro, dtype=jnp.bfloat16)
    assert np.isfinite(l1) and l1 == pytest.approx(l0, rel=1e-3)
    assert {x.dtype for x in jax.tree.leaves(g1)} == {np.dtype(np.float32)}
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a)  # bf16 rounding may differ under recompute


def test_scoring_with_remat_model(llama2_dir) -> None:
    from test_scoring import TOK as tok

    from kt_jax.inference.scoring import sequence_logprobs

    pairs = [("What is X?", "X is a river in the north."), ("Who?", "Nobody at all.")]
    plain = sequence_logprobs(load_pretrained(llama2_dir), tok, pairs, max_len=128)
    rem = sequence_logprobs(load_pretrained(llama2_dir, remat=True), tok, pairs, max_len=128)
    for (a, n), (b, m) in zip(plain, rem, strict=True):
        assert n == m and b == pytest.approx(a, abs=1e-5)
