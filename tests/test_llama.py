"""Flax Llama forward parity with HF PyTorch, packed segments, meshes and dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.hf_fixtures import LLAMA2_TINY, hf_logits, make_hf_llama

from kt_jax.model.hf import load_pretrained
from kt_jax.model.llama import Llama, LlamaConfig
from kt_jax.sharding import ShardingRules, to_device, variable_axes

# Built against HF PyTorch: skipped where torch is not installed (the Python 3.12 CI run).
torch = pytest.importorskip("torch")


def _ids(batch: int, length: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


@pytest.mark.parametrize("which", ["llama2_dir", "llama3_dir"])
def test_logits_match_hf(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    ids = _ids(3, 40)
    ours = np.asarray(load_pretrained(path)(jnp.asarray(ids)))
    ref = hf_logits(path, ids)
    assert ours.shape == ref.shape == (3, 40, 256)
    assert np.abs(ref).max() > 1.0, "logits too flat for the comparison to mean anything"
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_logits_match_hf_sharded_checkpoint(tmp_path) -> None:
    path = make_hf_llama(tmp_path / "sharded", seed=3, max_shard_size="40KB", **LLAMA2_TINY)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    ids = _ids(2, 24, seed=1)
    np.testing.assert_allclose(np.asarray(load_pretrained(path)(jnp.asarray(ids))), hf_logits(path, ids), atol=1e-4)


def test_hf_attention_mask_padding_matches_left_padded_hf(llama3_dir) -> None:
    """Right-padded rows in kt-jax (segment id 0 = pad) give HF's logits on the real tokens."""
    ids = _ids(2, 12, seed=4)
    valid = np.array([[1] * 12, [1] * 7 + [0] * 5], dtype=np.int32)
    ours = np.asarray(load_pretrained(llama3_dir)(jnp.asarray(ids), segment_ids_BxT=jnp.asarray(valid)))
    ref = hf_logits(llama3_dir, ids, attention_mask=torch.as_tensor(valid))
    np.testing.assert_allclose(ours[1, :7], ref[1, :7], atol=1e-4)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-4)


def test_packed_segments_equal_separate_rows(llama3_dir) -> None:
    model = load_pretrained(llama3_dir)
    a, b, c = _ids(1, 9, seed=5)[0], _ids(1, 6, seed=6)[0], _ids(1, 11, seed=7)[0]
    packed = np.concatenate([a, b, c, np.zeros(6, np.int32)])[None]
    segs = np.concatenate([np.full(9, 1), np.full(6, 2), np.full(11, 3), np.zeros(6)]).astype(np.int32)[None]
    pos = np.concatenate([np.arange(9), np.arange(6), np.arange(11), np.zeros(6)]).astype(np.int32)[None]
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(segs)))
    start = 0
    for piece in (a, b, c):
        alone = np.asarray(model(jnp.asarray(piece[None])))[0]
        np.testing.assert_allclose(out[0, start : start + len(piece)], alone, atol=1e-5)
        start += len(piece)


def test_explicit_attention_mask_restricts_attention(llama2_dir) -> None:
    """A prefix-shared row (prompt, then two siblings that see the prompt and themselves) equals two rows."""
    model = load_pretrained(llama2_dir)
    prompt, f1, f2 = _ids(1, 5, seed=8)[0], _ids(1, 4, seed=9)[0], _ids(1, 3, seed=10)[0]
    row = np.concatenate([prompt, f1, f2])[None]
    group = np.array([0] * 5 + [1] * 4 + [2] * 3)
    allowed = (group[:, None] == group[None, :]) | (group[None, :] == 0)
    pos = np.concatenate([np.arange(5), 5 + np.arange(4), 5 + np.arange(3)])[None].astype(np.int32)
    out = np.asarray(model(jnp.asarray(row), jnp.asarray(pos), attn_mask_BxTxT=jnp.asarray(allowed[None])))
    one = np.asarray(model(jnp.asarray(np.concatenate([prompt, f1])[None])))[0]
    two = np.asarray(model(jnp.asarray(np.concatenate([prompt, f2])[None])))[0]
    np.testing.assert_allclose(out[0, :9], one, atol=1e-5)
    np.testing.assert_allclose(out[0, 9:], two[5:], atol=1e-5)


def test_same_logits_on_every_mesh_and_rules_shardings(llama3_dir, mesh) -> None:
    ids = _ids(8, 16, seed=11)
    ref = np.asarray(load_pretrained(llama3_dir)(jnp.asarray(ids)))
    model = load_pretrained(llama3_dir, mesh=mesh)
    graphdef, state = nnx.split(model)
    rules = ShardingRules()
    for path, var in nnx.to_flat_state(state):
        expected = rules.spec(variable_axes(var))
        got = var.get_value().sharding
        assert got.mesh == mesh, path
        assert tuple(got.spec) + (None,) * (var.get_value().ndim - len(got.spec)) == tuple(expected) + (None,) * (
            var.get_value().ndim - len(expected)
        ), path
    batch = to_device(ids, mesh, process_local=False)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, batch)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_bf16_compute_close_to_float32(llama2_dir) -> None:
    ids = jnp.asarray(_ids(2, 16, seed=12))
    f32 = np.asarray(load_pretrained(llama2_dir)(ids))
    bf16 = np.asarray(load_pretrained(llama2_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)(ids))
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


def test_random_init_and_remat_gradients_agree() -> None:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    ids = jnp.asarray(_ids(2, 8, vocab=64, seed=13))

    def grads(remat: bool):
        model = Llama(cfg.replace(remat=remat), nnx.Rngs(0))
        loss = lambda m: jnp.mean(m(ids) ** 2)
        return jax.tree.leaves(nnx.grad(loss)(model))

    for a, b in zip(grads(False), grads(True), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(Llama(cfg, nnx.Rngs(0)), nnx.Param)))
