"""The written-out matmul backward (`kt_jax.ops.matmul`) against JAX's autodiff: op, model and train step, meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_steps import sft_batch

from kt_jax.errors import CheckpointError
from kt_jax.model.llama import Llama, LlamaConfig
from kt_jax.model.lora import LoRAConfig, apply_lora
from kt_jax.ops.matmul import explicit_backward_for, matmul
from kt_jax.sharding import state_shardings
from kt_jax.train.loop import stack_micro, to_device
from kt_jax.train.steps import make_sft_loss

CASES = [(jnp.float32, None), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, None)]


def _grads(explicit: bool, x, w, out_dtype, argnums):
    loss = lambda a, b: jnp.sum(jnp.sin(matmul(a, b, explicit_backward=explicit, out_dtype=out_dtype)
                                        .astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=argnums))(x, w)


@pytest.mark.parametrize("dtype,out_dtype", CASES, ids=["f32", "bf16-f32out", "bf16"])
@pytest.mark.parametrize("argnums", [(0,), (1,), (0, 1)], ids=["dx", "dw", "both"])
def test_gradients_equal_autodiff(dtype, out_dtype, argnums) -> None:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 7, 16), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (16, 24), jnp.float32).astype(dtype)
    want = _grads(False, x, w, out_dtype, argnums)
    got = _grads(True, x, w, out_dtype, argnums)
    # float32 inputs, one rounding: the reference for the bfloat16 cases
    exact = _grads(False, x.astype(jnp.float32), w.astype(jnp.float32), None, argnums)
    for a, b, ref in zip(got, want, exact, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == jnp.float32:  # the same products summed in another order
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        else:  # bfloat16 sums: the backend may accumulate in bfloat16 (jax 0.12), so both are held to the float32 sum
            ref = np.asarray(ref)
            tol = 2**-5 * float(np.abs(ref).max())
            for grad in (a, b):
                np.testing.assert_allclose(np.asarray(grad, np.float32), ref, rtol=0, atol=tol)


def test_only_needed_gradients_are_computed() -> None:
    x, w = jnp.ones((4, 8)), jnp.ones((8, 5))
    loss = lambda a, b: jnp.sum(matmul(a, b, explicit_backward=True))
    count = lambda argnums: str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(x, w)).count("dot_general")
    assert count((0,)) == 2 and count((1,)) == 2  # the forward and the one gradient asked for
    assert count((0, 1)) == 3
    # the weight gradient takes x first: no transposed copy of the output gradient
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w))
    assert "transpose" not in jaxpr


def test_auto_is_explicit_on_cpu_and_bad_names_fail() -> None:
    assert explicit_backward_for("auto") is (jax.default_backend() == "cpu")
    assert explicit_backward_for("explicit") and not explicit_backward_for("autodiff")
    with pytest.raises(CheckpointError, match="backward_dots"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    backward_dots="serial")


def _model(backward_dots: str, lora: bool, mesh) -> Llama:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=lora, backward_dots=backward_dots)
    model = Llama(cfg, nnx.Rngs(0))
    if lora:
        apply_lora(model, LoRAConfig(targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0))
        for path, value in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # B starts at zero: give it values
            value.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), value.get_value().shape))
    state = nnx.state(model)
    placed = jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-tied"])
def test_loss_gradients_equal_autodiff_on_meshes(mesh, lora: bool) -> None:
    batch = jax.tree.map(lambda x: x[0], to_device(stack_micro([sft_batch(np.random.default_rng(3), 8, 32)]), mesh))
    loss_fn = make_sft_loss(chunk_size=16)  # two chunks: the sparse LM head path

    def loss_and_grads(backward_dots: str):
        model = _model(backward_dots, lora, mesh)
        graphdef, trained, rest = nnx.split(model, nnx.LoRAParam if lora else nnx.Param, ...)
        value_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b)[0]))
        return jax.device_get(value_grad(trained, batch))

    (loss1, g1), (loss2, g2) = loss_and_grads("explicit"), loss_and_grads("autodiff")
    np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
    leaves = list(zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True))
    assert len(leaves) == (12 if lora else 21)  # LoRA: A and B of 3 targets in 2 layers
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
