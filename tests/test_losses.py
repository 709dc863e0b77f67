"""dpo_loss golden values (issue 9, recomputed here in float64 by hand) and the masked SFT cross-entropy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kt_jax.data.batch import SeqBatch
from kt_jax.model.llama import Llama, LlamaConfig
from kt_jax.ops.losses import dpo_loss, masked_mean_nll
from kt_jax.train.steps import sft_loss

PC, PR, RC, RR, BETA = -10.0, -12.0, -11.0, -10.5, 0.1


def _nls(x: float) -> float:
    """-log sigmoid(x) in float64."""
    return math.log1p(math.exp(-x))


def _arr(v: float) -> jax.Array:
    return jnp.array([v], jnp.float32)


def _loss(**kw) -> float:
    loss, _ = dpo_loss(_arr(PC), _arr(PR), _arr(RC), _arr(RR), beta=BETA, **kw)
    return float(loss)


DELTA = (PC - RC) - (PR - RR)  # 2.5
CASES = [
    ({}, 0.5759394199, _nls(BETA * DELTA)),
    ({"label_smoothing": 0.1}, 0.6009394199, 0.9 * _nls(BETA * DELTA) + 0.1 * _nls(-BETA * DELTA)),
    ({"loss_type": "robust", "label_smoothing": 0.1}, 0.5446894199,
     (0.9 * _nls(BETA * DELTA) - 0.1 * _nls(-BETA * DELTA)) / 0.8),
    ({"loss_type": "hinge"}, 0.75, max(0.0, 1 - BETA * DELTA)),
    ({"loss_type": "ipo"}, 6.25, (DELTA - 1 / (2 * BETA)) ** 2),
    ({"reference_free": True}, 0.5981388694, _nls(BETA * (PC - PR))),
    ({"sft_weight": 0.2, "chosen_nll": jnp.array([10.0 / 5])}, 0.9759394199, _nls(BETA * DELTA) + 0.2 * 2.0),
]


@pytest.mark.parametrize("kw,golden,f64", CASES, ids=[str(sorted(c[0])) for c in CASES])
def test_dpo_golden(kw, golden, f64):
    assert abs(f64 - golden) < 1e-9  # the number agrees with an independent float64 computation
    assert _loss(**kw) == pytest.approx(golden, abs=1e-6)


def test_dpo_metrics_and_batch_mean():
    pc, pr = jnp.array([-10.0, -5.0, -7.0]), jnp.array([-12.0, -4.0, -7.5])
    rc, rr = jnp.array([-11.0, -5.0, -6.0]), jnp.array([-10.5, -5.0, -8.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    d = np.array([(a - c) - (b - e) for a, b, c, e in zip(pc, pr, rc, rr, strict=True)], np.float64)
    assert float(loss) == pytest.approx(np.mean([_nls(0.1 * x) for x in d]), abs=1e-6)
    cr, rj = 0.1 * np.array(pc - rc), 0.1 * np.array(pr - rr)
    assert float(m["rewards/chosen"]) == pytest.approx(cr.mean(), abs=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(rj.mean(), abs=1e-6)
    assert float(m["rewards/accuracy"]) == pytest.approx(np.mean(cr > rj))
    assert float(m["rewards/margin"]) == pytest.approx((cr - rj).mean(), abs=1e-6)
    # weights drop padding rows from every mean
    loss_w, m_w = dpo_loss(pc, pr, rc, rr, beta=0.1, weights=jnp.array([1.0, 1.0, 0.0]))
    loss_2, m_2 = dpo_loss(pc[:2], pr[:2], rc[:2], rr[:2], beta=0.1)
    assert float(loss_w) == pytest.approx(float(loss_2), abs=1e-6)
    assert float(m_w["rewards/accuracy"]) == pytest.approx(float(m_2["rewards/accuracy"]))


def test_dpo_sft_token_reduction_and_grad():
    nll, n = jnp.array([2.0, 4.0]), jnp.array([5.0, 15.0])
    z = jnp.zeros(2)
    loss_e, _ = dpo_loss(z, z, z, z, sft_weight=1.0, chosen_nll=nll)
    loss_t, _ = dpo_loss(z, z, z, z, sft_weight=1.0, chosen_nll=nll, chosen_tokens=n, sft_reduction="token")
    assert float(loss_e) == pytest.approx(math.log(2) + 3.0, abs=1e-6)
    assert float(loss_t) == pytest.approx(math.log(2) + (10 + 60) / 20, abs=1e-6)
    # d loss / d pi_c = -beta * sigmoid(-beta * delta) (sigmoid loss), reference has no gradient path
    g = jax.grad(lambda p: dpo_loss(p, _arr(PR), _arr(RC), _arr(RR), beta=BETA)[0])(_arr(PC))
    assert float(g[0]) == pytest.approx(-BETA / (1 + math.exp(BETA * DELTA)), abs=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(z, z, z, z, sft_weight=0.2)


def test_masked_mean_nll_counts_only_masked():
    logp = jnp.array([[-1.0, -2.0, -100.0], [-3.0, -50.0, -4.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss, count = masked_mean_nll(logp, mask)
    assert float(count) == 4 and float(loss) == pytest.approx(10.0 / 4)


def test_sft_loss_matches_float64_log_softmax():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    model = Llama(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (2, 12)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    mask = (rng.random((2, 12)) > 0.4).astype(np.float32)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)
    batch = jax.tree.map(jnp.asarray, SeqBatch(ids, targets, mask, positions, np.ones_like(ids)))  # one segment/row
    loss, m = sft_loss(model, batch, chunk_size=5)
    logits = np.asarray(model(jnp.asarray(ids)), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    assert float(loss) == pytest.approx((nll * mask).sum() / mask.sum(), abs=1e-5)
    assert float(m["tokens"]) == mask.sum()
