"""Chunked target log-probs against float64 numpy, gradients against the naive log-softmax, sums, model batches."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.hf_fixtures import hf_logits

from kt_jax.data.batch import SeqBatch
from kt_jax.model.hf import load_pretrained
from kt_jax.ops import logprobs
from kt_jax.ops.logprobs import masked_sum, token_logprobs
from kt_jax.train.steps import batch_logprobs


def _inputs(b: int = 3, t: int = 37, d: int = 16, v: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.8).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    return hidden, w, targets


def _float64_reference(hidden: np.ndarray, w: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 128])
def test_matches_float64_reference(chunk: int) -> None:
    hidden, w, targets = _inputs()
    ref = _float64_reference(hidden, w, targets)
    got = jax.jit(lambda h, k, y: token_logprobs(h, k, y, chunk_size=chunk))(hidden, w, targets)
    assert got.dtype == jnp.float32 and got.shape == targets.shape
    assert ref.min() < -8.0  # far from uniform, so an error would show
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_gradients_match_naive_log_softmax() -> None:
    hidden, w, targets = _inputs(b=2, t=21)
    weights = jnp.asarray(np.random.default_rng(1).random(targets.shape).astype(np.float32))

    def naive(h, k):
        logp = jax.nn.log_softmax(h @ k, axis=-1)
        return jnp.sum(weights * jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])

    def chunked(h, k):
        return jnp.sum(weights * token_logprobs(h, k, targets, chunk_size=4))

    g_ref = jax.grad(naive, argnums=(0, 1))(hidden, w)
    g_got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, w)
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", [False, True], ids=["dense", "sparse"])
def test_logits_stored_only_under_the_budget(where: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above STORED_LOGITS_BYTES the compiled program never holds a [B, T, V] float32 buffer when T is chunked
    (the backward recomputes each chunk); below it the backward keeps them all instead of a second LM head."""
    b, t, d, v = 2, 64, 8, 1000
    hidden, w, targets = jnp.zeros((b, t, d)), jnp.zeros((d, v)), jnp.zeros((b, t), jnp.int32)
    keep = jnp.ones((b, t)) if where else None
    fn = lambda h, k: jnp.sum(token_logprobs(h, k, targets, chunk_size=16, where_BxT=keep))

    def largest_vocab_buffer() -> int:
        hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(hidden, w).compile().as_text()
        sizes = [int(np.prod([int(x) for x in dims.split(",") if x]))
                 for dims in re.findall(r"f32\[([0-9,]*)\]", hlo) if str(v) in dims.split(",")]
        assert sizes, "no vocab-sized buffer found: the check would be vacuous"
        return max(sizes)

    assert b * t * v * 4 < logprobs.STORED_LOGITS_BYTES
    assert largest_vocab_buffer() >= b * t * v  # kept for the backward
    monkeypatch.setattr(logprobs, "STORED_LOGITS_BYTES", b * t * v * 4 - 1)
    assert largest_vocab_buffer() <= b * 16 * v, "a buffer holds logits of more than one chunk"


def _sparse_mask(b: int, t: int, seed: int) -> np.ndarray:
    """Loss masks like packed SFT rows: a few response spans per row, one row empty, weights other than 1."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, t), np.float32)
    for row in range(b - 1):
        for start in rng.choice(t - 4, size=2, replace=False):
            mask[row, start:start + int(rng.integers(1, 5))] = rng.choice([1.0, 0.5])
    return mask


@pytest.mark.parametrize("chunk", [1, 4, 8, 37, 64])
def test_where_computes_kept_positions_only_and_matches_float64(chunk: int) -> None:
    hidden, w, targets = _inputs(b=4, t=37)
    mask = _sparse_mask(4, 37, seed=chunk)
    ref = _float64_reference(hidden, w, targets)
    got = np.asarray(jax.jit(lambda h, k, y, m: token_logprobs(h, k, y, chunk_size=chunk, where_BxT=m))(
        hidden, w, targets, mask))
    kept = mask > 0
    np.testing.assert_allclose(got[kept], ref[kept], rtol=1e-5, atol=1e-5)
    assert not got[~kept].any()  # the empty row and every unkept position hold 0
    full = np.asarray(token_logprobs(hidden, w, targets, chunk_size=chunk))
    np.testing.assert_allclose(got[kept], full[kept], rtol=1e-6, atol=1e-6)


def test_masked_sums_gradients_match_the_full_path() -> None:
    hidden, w, targets = _inputs(b=3, t=40)
    mask = _sparse_mask(3, 40, seed=3)

    def full(h, k):
        return jnp.sum(masked_sum(token_logprobs(h, k, targets, chunk_size=8), mask)[0])

    def skipping(h, k):
        return jnp.sum(masked_sum(token_logprobs(h, k, targets, chunk_size=8, where_BxT=mask), mask)[0])

    g_ref = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, w)
    g_got = jax.jit(jax.grad(skipping, argnums=(0, 1)))(hidden, w)
    assert np.abs(np.asarray(g_ref[0])).sum() > 0
    for a, b in zip(g_got, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # positions outside the mask get exactly no gradient
    assert not np.asarray(g_got[0])[mask == 0].any()


def test_bfloat16_hidden_gives_float32_logprobs() -> None:
    hidden, w, targets = _inputs()
    got = token_logprobs(jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), targets, chunk_size=8)
    assert got.dtype == jnp.float32
    ref = _float64_reference(hidden, w, targets)
    assert np.abs(np.asarray(got) - ref).max() < 0.1 * np.abs(ref).max()


def segment_sum(
    logp_BxT: jax.Array, mask_BxT: jax.Array, segment_ids_BxT: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """Per-segment (sum of masked logp, masked token count) [B, S], in jax (column j = segment id j + 1)."""
    mask = mask_BxT.astype(jnp.float32)
    onehot_BxTxS = segment_ids_BxT[..., None] == jnp.arange(1, num_segments + 1, dtype=segment_ids_BxT.dtype)
    weights_BxTxS = onehot_BxTxS.astype(jnp.float32) * mask[..., None]
    logp = jnp.where(mask > 0, logp_BxT, 0.0)
    return jnp.einsum("bts,bt->bs", weights_BxTxS, logp), jnp.sum(weights_BxTxS, axis=1)


def test_masked_and_segment_sums() -> None:
    logp = jnp.asarray([[-1.0, -2.0, -3.0, -np.inf, -5.0], [-0.5, -0.25, -1.0, -2.0, -4.0]])
    mask = jnp.asarray([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], jnp.float32)
    segs = jnp.asarray([[1, 1, 2, 0, 2], [1, 1, 1, 3, 3]], jnp.int32)
    total, count = masked_sum(logp, mask)
    np.testing.assert_allclose(np.asarray(total), [-8.0, -3.25])
    np.testing.assert_allclose(np.asarray(count), [3.0, 3.0])
    seg_total, seg_count = segment_sum(logp, mask, segs, 3)
    np.testing.assert_allclose(np.asarray(seg_total), [[-3.0, -5.0, 0.0], [-1.25, 0.0, -2.0]])
    np.testing.assert_allclose(np.asarray(seg_count), [[2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    g = jax.grad(lambda x: jnp.sum(masked_sum(x, mask)[0]))(jnp.where(jnp.isinf(logp), 0.0, logp))
    np.testing.assert_allclose(np.asarray(g), np.asarray(mask))


def test_batch_logprobs_match_hf_log_softmax(llama3_dir) -> None:
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 20)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    ones = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(20, dtype=np.int32), ids.shape)
    logits = hf_logits(llama3_dir, ids).astype(np.float64)
    ref = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - np.log(np.exp(logits).sum(-1))
    response = np.zeros((2, 20), np.float32)
    response[0, 12:19], response[1, 3:9] = 1.0, 1.0  # responses in different chunks of the two rows
    model = load_pretrained(llama3_dir)
    for mask in (ones.astype(np.float32), response):
        batch = SeqBatch(ids, targets, mask, positions, ones)  # one segment per row: plain causal
        got = np.asarray(batch_logprobs(model, jax.tree.map(jnp.asarray, batch), chunk_size=6))
        np.testing.assert_allclose(got[mask > 0], ref[mask > 0], atol=1e-4)
        assert not got[mask == 0].any()
