"""Attention backends: splash (Pallas interpret mode on CPU) against the xla path on packed batches; dispatch."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kt_jax.errors import CheckpointError, ConfigError
from kt_jax.model.attention import (
    AttentionWindows,
    attention,
    dot_attention,
    resolve_backend,
    splash_attention,
    windowed_attention,
)
from kt_jax.model.llama import Llama, LlamaConfig, ShardContext
from kt_jax.sharding import state_shardings, to_device
from kt_jax.train.config import TrainConfig


def packed_segments(batch: int, length: int, seed: int) -> np.ndarray:
    """Segment ids [B, T]: each row packs 2-4 segments of random lengths (ids from 1) then padding (0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), size=rng.integers(3, 6), replace=False))
        start = 0
        for i, end in enumerate(cuts[:-1]):
            seg[row, start:end] = i + 1
            start = end
        # the last cut leaves length - cuts[-1] padding tokens at the end of the row
    return seg


def qkv(batch: int, length: int, heads: int, kv_heads: int, dim: int, seed: int) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, n, dim) for n in (heads, kv_heads, kv_heads)]
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)


def test_packed_segments_have_several_segments_and_padding() -> None:
    seg = packed_segments(2, 128, seed=0)
    for row in seg:
        assert len(set(row[row > 0].tolist())) >= 2 and row[-1] == 0


@pytest.mark.slow
def test_splash_matches_xla_on_packed_batch_forward_and_gradients() -> None:
    b, t, h, kv, d = 2, 120, 4, 2, 64  # grouped-query heads; T padded to 128 inside the splash path
    q, k, v = qkv(b, t, h, kv, d, seed=1)
    seg = jnp.asarray(packed_segments(b, t, seed=2))
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(b, t, h, d)), jnp.float32)

    def loss(backend_fn):
        return lambda q, k, v: jnp.sum(backend_fn(q, k, v) * weights)

    xla = lambda q, k, v: attention(q, k, v, seg, backend="xla")
    splash = lambda q, k, v: splash_attention(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(splash(q, k, v)), np.asarray(xla(q, k, v)), atol=1e-5, rtol=0)
    g_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    g_splash = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    for name, a, e in zip("qkv", g_splash, g_xla, strict=True):
        assert float(jnp.max(jnp.abs(e))) > 1e-2, name  # the gradient is not trivially zero
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-4, rtol=0, err_msg=f"d{name}")


def test_splash_differs_from_xla_when_segments_are_ignored() -> None:
    """The comparison above can fail: splash without the segment ids attends across packed segments."""
    q, k, v = qkv(1, 128, 2, 2, 64, seed=4)
    seg = jnp.asarray(packed_segments(1, 128, seed=5))
    gap = jnp.max(jnp.abs(splash_attention(q, k, v, None) - attention(q, k, v, seg)))
    assert float(gap) > 1e-2


def tiny_llama(attention_backend: str, mesh: jax.sharding.Mesh) -> Llama:
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=32, attention=attention_backend)
    model = Llama(cfg, nnx.Rngs(0), shard_ctx=ShardContext(mesh))
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


@pytest.mark.slow
def test_llama_forward_with_splash_matches_xla_on_mesh(mesh: jax.sharding.Mesh) -> None:
    b, t = 8, 96
    seg = packed_segments(b, t, seed=6)
    positions = np.zeros_like(seg)
    for row in range(b):
        for s in np.unique(seg[row]):
            where = np.flatnonzero(seg[row] == s)
            positions[row, where] = np.arange(len(where))
    ids = np.random.default_rng(7).integers(0, 64, size=(b, t)).astype(np.int32)
    ids, positions, seg = to_device((ids, positions.astype(np.int32), seg), mesh, process_local=False)

    def logits(backend: str) -> np.ndarray:
        graphdef, state = nnx.split(tiny_llama(backend, mesh))
        fn = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
        return np.asarray(fn(state, ids, positions, seg))

    expected, got = logits("xla"), logits("splash")
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_load_pretrained_sets_the_backend(llama2_dir) -> None:
    from kt_jax.model.hf import load_pretrained

    ids = jnp.asarray(np.random.default_rng(11).integers(0, 256, size=(1, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1, 2, 0]], 8, axis=1), jnp.int32)
    xla, splash = (load_pretrained(llama2_dir, attention=name) for name in ("xla", "splash"))
    assert splash.config.attention == "splash" and xla.config.attention == "xla"
    np.testing.assert_allclose(np.asarray(splash(ids, None, seg)), np.asarray(xla(ids, None, seg)), atol=1e-5, rtol=0)


def test_prefix_mask_falls_back_to_xla() -> None:
    """An extra [B, T, T] mask cannot be expressed as splash segment ids: the splash backend takes the xla path."""
    q, k, v = qkv(1, 16, 2, 2, 8, seed=8)  # T=16 is not a splash block multiple: only the xla path runs it
    seg = jnp.ones((1, 16), jnp.int32)
    extra = jnp.asarray(np.random.default_rng(9).random((1, 16, 16)) > 0.3) | jnp.eye(16, dtype=bool)[None]
    np.testing.assert_array_equal(
        np.asarray(attention(q, k, v, seg, extra, backend="splash")),
        np.asarray(attention(q, k, v, seg, extra, backend="xla")),
    )


def test_backend_resolution_by_platform() -> None:
    assert resolve_backend("auto") == "xla"  # these tests run on CPU
    assert resolve_backend("auto", "cpu") == "xla"
    assert resolve_backend("auto", "tpu") == "splash"
    assert resolve_backend("auto", "gpu") == "cudnn"
    assert resolve_backend("cudnn", "gpu") == "cudnn"
    assert resolve_backend("splash", "cpu") == "splash"
    with pytest.raises(ConfigError, match="attention='flash'"):
        resolve_backend("flash")


def test_cudnn_on_cpu_is_a_clear_error() -> None:
    q, k, v = qkv(1, 8, 2, 2, 8, seed=10)
    with pytest.raises(ConfigError, match=r"cudnn.*needs an NVIDIA GPU.*'cpu'"):
        attention(q, k, v, backend="cudnn")


def test_attention_setting_is_validated_in_configs() -> None:
    with pytest.raises(CheckpointError, match="attention='flash'"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    attention="flash")
    with pytest.raises(ConfigError, match=r"train\.attention"):
        TrainConfig(attention="flash").validate()
    TrainConfig(attention="auto").validate()


def random_windows(batch: int, length: int, seed: int) -> tuple[AttentionWindows, np.ndarray, np.ndarray]:
    """Windows over each row (a 6-token shared head every window sees, then contiguous spans; the last span of a
    row left out), their equivalent dense [B, T, T] mask, and which positions are queried."""
    rng = np.random.default_rng(seed)
    head, q, s = 6, 40, 46
    spans = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(head + 4, length - 4), size=4, replace=False))
        bounds = [head, *cuts.tolist()]
        spans.append([(a, b) for a, b in itertools.pairwise(bounds) if b - a <= q])
    w = 1 + max(len(x) for x in spans)
    query_idx, key_idx = np.zeros((batch, w, q), np.int32), np.zeros((batch, w, s), np.int32)
    allowed, slot_idx = np.zeros((batch, w, q, s), bool), np.zeros((batch, length), np.int32)
    dense, queried = np.zeros((batch, length, length), bool), np.zeros((batch, length), bool)
    for r in range(batch):
        query_idx[r, 0, :head], key_idx[r, 0, :head], slot_idx[r, :head] = range(head), range(head), range(head)
        allowed[r, 0, :head, :head] = np.tri(head, dtype=bool)
        for i, (a, b) in enumerate(spans[r], start=1):
            n = b - a
            query_idx[r, i, :n], key_idx[r, i, :head] = range(a, b), range(head)
            key_idx[r, i, head:head + n] = range(a, b)
            slot_idx[r, a:b] = i * q + np.arange(n)
            allowed[r, i, :n, :head] = rng.random((n, head)) < 0.7
            allowed[r, i, :n, head:head + n] = rng.random((n, n)) < 0.5
            allowed[r, i, np.arange(n), head + np.arange(n)] = True  # every query sees at least itself
        sizes = [head] + [b_ - a_ for a_, b_ in spans[r]]
        for i, n in enumerate(sizes):
            for j in range(n):
                pos = query_idx[r, i, j]
                queried[r, pos] = True
                dense[r, pos, key_idx[r, i][allowed[r, i, j]]] = True
    return AttentionWindows(query_idx, key_idx, allowed, slot_idx), dense, queried


def test_windowed_attention_matches_dense_attention_with_the_same_mask(mesh: jax.sharding.Mesh) -> None:
    b, t = 8, 96
    windows, dense, queried = random_windows(b, t, seed=12)
    q, k, v = qkv(b, t, 4, 2, 16, seed=13)  # grouped-query: 2 query heads per key/value head
    expected = np.asarray(dot_attention(q, k, v, jnp.asarray(dense)))
    q, k, v, windows = to_device((q, k, v, windows), mesh, process_local=False)
    got = np.asarray(jax.jit(windowed_attention)(q, k, v, windows))
    assert queried.sum() > b * t // 2 and (~queried).sum() > 0
    np.testing.assert_allclose(got[queried], expected[queried], atol=2e-6, rtol=0)
    via_backend = jax.jit(lambda *a: attention(*a, None, None, backend="splash", windows=windows))(q, k, v)
    np.testing.assert_allclose(np.asarray(via_backend)[queried], got[queried], atol=1e-6, rtol=0)  # xla path
