"""Grouped preference batches: every pair's loss, metrics and gradients equal the per-pair forward; loader coverage."""

from __future__ import annotations

import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_loader import Bytes

from kt_jax import sharding
from kt_jax.data.batch import GroupedPreferenceBatch, PreferenceBatch, pad_to, seq_len
from kt_jax.data.loader import DataConfig, make_dataset
from kt_jax.data.packing import fit_pair_rows, merge_pair_rows, pack_pair_rows, preference_rows
from kt_jax.data.records import KCRecord
from kt_jax.data.templates import alpaca_prompt
from kt_jax.model.llama import Llama, LlamaConfig
from kt_jax.sharding import state_shardings
from kt_jax.train.config import DPOConfig, OptimConfig
from kt_jax.train.loop import stack_micro, to_device
from kt_jax.train.optimizer import make_optimizer
from kt_jax.train.state import create_state
from kt_jax.train.steps import make_dpo_loss, make_eval_step, make_train_step, preference_logps

pytestmark = pytest.mark.timeout(300)
METRICS = ("loss", "loss/dpo", "loss/sft", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
           "logps/chosen", "logps/rejected")


def _text(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list("abcdefghij klmnop"), n))


def kc_records(seed: int = 0) -> list[KCRecord]:
    """KC-shaped groups of 3, 2 and 1 rejected answers, one group too long to share (max_len 320), one to split."""
    rng = np.random.default_rng(seed)
    recs = []
    for g, n_rej in enumerate((3, 2, 1, 3, 3, 2, 3)):
        chosen = _text(rng, int(rng.integers(10, 40)))
        for _ in range(n_rej):
            recs.append(KCRecord(f"Q{g}?", chosen, _text(rng, int(rng.integers(5, 40))), "factuality",
                                 ref_chosen_logp=float(-rng.uniform(20, 60)),
                                 ref_rejected_logp=float(-rng.uniform(20, 60))))
    long_chosen = _text(rng, 100)  # prompt 141 + 100 + 121 > 320: per-pair fallback row
    recs.append(KCRecord("Q7?", long_chosen, _text(rng, 120), "logicality", ref_chosen_logp=-80.0,
                         ref_rejected_logp=-90.0))
    split_chosen = _text(rng, 40)  # 141 + 40 + 2 * 61 fits, the third rejected opens a second row
    for _ in range(3):
        recs.append(KCRecord("Q8?", split_chosen, _text(rng, 60), "completeness", ref_chosen_logp=-50.0,
                             ref_rejected_logp=-55.0))
    return recs


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"max_len": 320, "batch_size": 8, "shuffle": False, "num_epochs": 1, "group_preferences": True,
                         **kw})


def _tiny_model() -> Llama:
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, dtype="float32")
    return Llama(cfg, nnx.Rngs(0))


def _place(model: Llama, mesh) -> Llama:
    state = nnx.state(model)
    placed = jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


def _pair_texts(batch: GroupedPreferenceBatch) -> list[tuple[str, str, float, float]]:
    """(chosen text, rejected text, ref chosen, ref rejected) of every filled pair slot of a host batch."""
    out = []
    for b in range(batch.seq.input_ids.shape[0]):
        ids, seg, grp = batch.seq.input_ids[b], batch.seq.segment_ids[b], batch.group_ids[b]
        text = lambda s, ids=ids, seg=seg, grp=grp: Bytes().decode(
            np.concatenate([ids[(grp == grp[seg == s][0]) & (seg == 0)], ids[seg == s]]))  # shared prompt + answer
        for k in range(batch.chosen_seg.shape[1]):
            if batch.chosen_seg[b, k]:
                out.append((text(batch.chosen_seg[b, k]), text(batch.rejected_seg[b, k]),
                            float(batch.ref_chosen_logps[b, k]), float(batch.ref_rejected_logps[b, k])))
    return out


def _record_pairs(recs: list[KCRecord]) -> list[tuple[str, str, float, float]]:
    return [(alpaca_prompt(r.question) + r.chosen, alpaca_prompt(r.question) + r.rejected,
             float(np.float32(r.ref_chosen_logp)), float(np.float32(r.ref_rejected_logp))) for r in recs]


def test_rows_share_the_prompt_split_and_fall_back() -> None:
    prompt, chosen = [1, 5, 6, 7], [8, 9, 2]
    rows = preference_rows(prompt, chosen, [([10, 2], -1.0, -2.0), ([11, 12, 2], -1.0, -3.0), ([13, 2], -1.0, -4.0)],
                           max_len=14, max_pairs=3)
    # prefix [1, 5, 6] + [7, 8, 9, 2] + [7, 10, 2] + [7, 11, 12, 2] = 14 tokens; the third rejected needs a new row
    assert [r.length for r in rows] == [14, 10] and [len(r.pairs) for r in rows] == [2, 1]
    assert rows[0].pairs == ((1, 2, -1.0, -2.0), (1, 3, -1.0, -3.0))
    assert preference_rows(prompt, chosen, [([10, 2], 0.0, 0.0)] * 3, 40, max_pairs=2)[1].pairs == ((1, 2, 0.0, 0.0),)
    fallback = preference_rows(prompt, chosen, [([10] * 8 + [2], -1.0, -2.0)], max_len=14, max_pairs=3)
    assert len(fallback) == 1 and fallback[0].length == 4 + 3 + 4 + 9 and len(fallback[0].items) == 2


def test_loader_yields_each_pair_once_per_epoch() -> None:
    recs = kc_records()
    rng = np.random.default_rng(1)
    order = [recs[i] for i in rng.permutation(len(recs))]  # group members need not be adjacent
    for batch_size, processes in ((8, 1), (2, 1), (1, 1), (4, 2)):
        seen = []
        for p in range(processes):
            cfg = _cfg(batch_size=batch_size, shuffle=True, seed=3)
            it = iter(make_dataset(order, Bytes(), cfg, task=_dpo(), process_index=p, process_count=processes))
            batches = list(it)
            assert all(isinstance(b, GroupedPreferenceBatch) for b in batches)
            pairs = batch_size // processes  # every batch but the last carries exactly its pairs
            assert all(b.seq.input_ids.shape[0] <= pairs and b.chosen_seg.shape[1] == pairs for b in batches)
            if processes > 1:  # every process one row per pair: the same local shape on all of them
                assert {b.seq.input_ids.shape[0] for b in batches} == {pairs}
            assert [len(_pair_texts(b)) for b in batches[:-1]] == [pairs] * (len(batches) - 1)
            seen += [pair for b in batches for pair in _pair_texts(b)]
            assert it.counts["examples"] == len(_pair_texts_of(batches)) and it.counts["skipped_overlength"] == 0
        assert collections.Counter(seen) == collections.Counter(_record_pairs(recs)), (batch_size, processes)
    fallback = [b for b in make_dataset(recs, Bytes(), _cfg(), task=_dpo()) if b.seq.input_ids.shape[1] > 320]
    assert len(fallback) == 1 and fallback[0].seq.input_ids.shape[1] == 512  # the per-pair row: 2 x (141 + ...)


def test_rows_are_the_bucket_of_the_longest_and_hold_several_groups() -> None:
    """A batch's rows are as long as the bucket of its longest row, and shorter rows share a row first-fit."""
    a, b, c = (preference_rows([1, 5, 6, 7], [8] * n + [2], [([10, 2], -1.0, -2.0)] * k, 64, 3)[0]
               for n, k in ((9, 3), (5, 2), (30, 1)))  # 23, 16 and 38 tokens
    length, rows = fit_pair_rows([a, b, c], max_len=64, sizes=(16, 32, 48, 64), slots=8)
    assert length == 48 and [r.length for r in rows] == [38, 39]  # c alone; a + b share a row (longest first)
    assert rows[1] == merge_pair_rows([a, b]) and rows[1].pairs[3:] == ((5, 6, -1.0, -2.0), (5, 7, -1.0, -2.0))
    fits = lambda slots: [(r.length, len(r.pairs)) for r in fit_pair_rows([a, b, c], 64, (64,), slots)[1]]
    assert fits(8) == [(61, 4), (16, 2)] and fits(3) == [(54, 3), (23, 3)]  # at most `slots` pairs a row
    batch = pack_pair_rows(rows, length, 8)  # a's group is 1, b's group 2: b's answers see b's prompt only
    grp, seg = batch.group_ids[1], batch.seq.segment_ids[1]
    assert list(grp[:39]) == [1] * 23 + [2] * 16 and not grp[39:].any()
    assert list(np.unique(seg[grp == 2])) == [0, 5, 6, 7] and list(batch.chosen_seg[1, :5]) == [1, 1, 1, 5, 5]
    # b's positions restart at 0, each answer continuing its prompt: as in b's own sequences
    assert list(batch.seq.positions[1, 23:39]) == [*range(10), 3, 4, 5, 3, 4, 5]


def _pair_texts_of(batches: list[GroupedPreferenceBatch]) -> list[tuple[str, str, float, float]]:
    return [pair for b in batches for pair in _pair_texts(b)]


def _dpo():
    from kt_jax.data.batch import Task

    return Task.DPO


def test_resume_inside_a_split_group() -> None:
    recs = kc_records()
    cfg = _cfg(batch_size=1, shuffle=True, num_epochs=2, seed=5)
    it = iter(make_dataset(recs, Bytes(), cfg, task=_dpo()))
    states, batches = [], []
    for _ in range(14):
        states.append(it.get_state())
        batches.append(next(it))
    assert any(s["part"] > 0 for s in states)  # some batch boundary falls inside Q8's two rows
    for i in (3, 9):
        other = iter(make_dataset(recs, Bytes(), cfg, task=_dpo()))
        other.set_state(states[i])
        for want in batches[i:]:
            got = next(other)
            jax.tree.map(np.testing.assert_array_equal, got, want)


def _loader_batches(recs: list[KCRecord], pairs: int, **kw) -> tuple[GroupedPreferenceBatch, PreferenceBatch]:
    """The first grouped and the first per-pair batch of `pairs` pairs of the same records and config."""
    grouped = next(iter(make_dataset(recs, Bytes(), _cfg(batch_size=pairs, **kw), task=_dpo())))
    per_pair = next(iter(make_dataset(recs, Bytes(), _cfg(batch_size=pairs, group_preferences=False, **kw),
                                      task=_dpo())))
    return grouped, per_pair


def _slot_order(grouped: GroupedPreferenceBatch, per_pair: PreferenceBatch) -> list[int]:
    """The per-pair row of each filled grouped pair slot, in slot order (rows merge longest first)."""
    rows = {pair: i for i, pair in enumerate(_per_pair_texts(per_pair))}
    order = [rows[pair] for pair in _pair_texts(grouped)]
    assert sorted(order) == list(range(len(rows)))
    return order


def _per_pair_texts(batch: PreferenceBatch) -> list[tuple[str, str, float, float]]:
    """(chosen text, rejected text, ref chosen, ref rejected) of every filled row of a host per-pair batch."""
    text = lambda side, b: Bytes().decode(side.input_ids[b][side.segment_ids[b] > 0])
    return [(text(batch.chosen, b), text(batch.rejected, b), float(batch.ref_chosen_logps[b]),
             float(batch.ref_rejected_logps[b]))
            for b in range(batch.chosen.input_ids.shape[0]) if batch.chosen.segment_ids[b].any()]


@pytest.mark.slow
def test_loss_and_metrics_equal_per_pair_on_meshes(mesh) -> None:
    recs = kc_records()
    grouped, per_pair = _loader_batches(recs, 24, row_multiple=8)  # every pair: 20 shared, 1 per-pair fallback row
    assert sorted(_pair_texts(grouped)) == sorted(_per_pair_texts(per_pair)) == sorted(_record_pairs(recs))
    # rows of the fallback's bucket: two groups (or a group and the fallback row) share most of them
    assert grouped.seq.input_ids.shape == (8, 512) and per_pair.chosen.input_ids.shape == (24, 320)
    assert (grouped.group_ids.max(1) >= 2).sum() >= 4
    loss_fn = make_dpo_loss(DPOConfig(beta=0.1, sft_weight=0.3), chunk_size=64)
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    ts = create_state(_place(_tiny_model(), mesh), tx, mesh)
    step = make_eval_step(ts, loss_fn)
    got = jax.device_get(step(ts.params, ts.frozen, to_device(stack_micro([grouped]), mesh)))
    want = jax.device_get(step(ts.params, ts.frozen, to_device(stack_micro([per_pair]), mesh)))
    for name in METRICS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert 0 < got["rewards/accuracy"] < 1  # a mix of won and lost pairs, so the mean over pairs is tested
    # fewer tokens: the prompt once per row, the chosen answer once per group
    assert got["tokens"] < 0.7 * want["tokens"]


@pytest.mark.slow
def test_per_pair_logps_and_gradients_equal_per_pair() -> None:
    recs = kc_records()[:9]  # groups Q0-Q3 (3, 2, 1, 3 pairs): one grouped batch of 4 rows
    grouped, per_pair = _loader_batches(recs, 9)
    assert int((grouped.chosen_seg > 0).sum()) == 9 and grouped.seq.input_ids.shape == (4, 256)
    model = _tiny_model()
    g = jax.tree.map(jnp.asarray, grouped)
    p = jax.tree.map(jnp.asarray, per_pair)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logps = jax.jit(lambda prm, batch: preference_logps(nnx.merge(graphdef, prm, rest), batch, chunk_size=64))
    pc, pr, nc, nr, rc, rr = (np.asarray(x) for x in logps(params, g))
    qc, qr, mc, mr, sc, sr = (np.asarray(x) for x in logps(params, p))
    filled, order = nc > 0, _slot_order(grouped, per_pair)
    for a, b in ((pc, qc), (pr, qr), (nc, mc), (nr, mr), (rc, sc), (rr, sr)):
        np.testing.assert_allclose(a[filled], b[order], rtol=1e-5, atol=1e-5)
    cfg = DPOConfig(beta=0.1, sft_weight=0.3)
    loss_fn = make_dpo_loss(cfg, chunk_size=64)
    grads = jax.jit(jax.grad(lambda prm, batch: loss_fn(nnx.merge(graphdef, prm, rest), batch)[0]))
    for a, b in zip(jax.tree.leaves(grads(params, g)), jax.tree.leaves(grads(params, p)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_accumulated_train_step_equals_per_pair() -> None:
    """Two grouped microbatches against two per-pair microbatches of the same pairs: same loss and update."""
    recs = kc_records()
    grouped = list(make_dataset(recs, Bytes(), _cfg(batch_size=4), task=_dpo()))[:2]  # Q1 split across the two
    per_pair = list(make_dataset(recs, Bytes(), _cfg(batch_size=4, group_preferences=False), task=_dpo()))[:2]
    assert [sorted(_pair_texts(b)) for b in grouped] == [sorted(_per_pair_texts(b)) for b in per_pair]
    assert [b.seq.input_ids.shape[0] for b in grouped] == [2, 3]  # stacked: the first gets a padding row
    out = []
    for micro in (grouped, per_pair):
        tx = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, eps=1e-6), 10)
        ts = create_state(_tiny_model(), tx)
        step = make_train_step(ts, tx, make_dpo_loss(DPOConfig(sft_weight=0.3), chunk_size=64))
        params, _, metrics = step(ts.params, ts.opt_state, ts.frozen, to_device(stack_micro(micro), None))
        out.append((jax.device_get(metrics), jax.device_get(params)))
    for name in (*METRICS, "grad_norm"):
        np.testing.assert_allclose(out[0][0][name], out[1][0][name], rtol=1e-5, atol=1e-5, err_msg=name)
    # AdamW divides by sqrt(v) + eps: eps = 1e-6 keeps float32 rounding in near-zero gradients from growing into
    # update noise of up to lr = 1e-3 (with eps = 1e-8 one weight of 8192 moved 2e-5 apart)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), out[0][1], out[1][1])


def test_grouping_flag_selects_the_layout() -> None:
    recs = kc_records()[:3]
    assert DataConfig().group_preferences  # on by default
    assert isinstance(next(iter(make_dataset(recs, Bytes(), DataConfig(), task=_dpo()))), GroupedPreferenceBatch)
    off = dataclasses.replace(_cfg(), group_preferences=False)
    assert isinstance(next(iter(make_dataset(recs, Bytes(), off, task=_dpo()))), PreferenceBatch)


@pytest.mark.slow
def test_grouped_batches_are_the_per_pair_batches_and_train_alike() -> None:
    """Consecutive grouped batches hold the per-pair loader's pairs in its order; the same losses step by step."""
    recs = kc_records()  # 21 pairs in groups of 3, 2, 1, 3, 3, 2, 3, 1, 3: batches of 8 split Q3 and Q6
    cfg = _cfg(batch_size=8)
    it = iter(make_dataset(recs, Bytes(), cfg, task=_dpo()))
    states, grouped = [], []
    for batch in it:
        grouped.append(batch)
        states.append(it.get_state())
    per_pair = list(make_dataset(recs, Bytes(), dataclasses.replace(cfg, group_preferences=False), task=_dpo()))
    assert len(grouped) == len(per_pair) == 3 and [s["part"] for s in states] == [2, 2, 0]
    assert [sorted(_pair_texts(b)) for b in grouped] == [sorted(_per_pair_texts(b)) for b in per_pair]
    assert [len(_pair_texts(b)) for b in grouped] == [8, 8, 5]
    assert [b.seq.input_ids.shape for b in grouped] == [(4, 256), (4, 256), (3, 512)]  # the fallback: 512 rows
    for i in (0, 1):  # resume inside a split group, from a JSON round trip of the state
        other = iter(make_dataset(recs, Bytes(), cfg, task=_dpo()))
        other.set_state(json.loads(json.dumps(states[i])))
        for want in grouped[i + 1:]:
            jax.tree.map(np.testing.assert_array_equal, next(other), want)
        with pytest.raises(StopIteration):
            next(other)
    out = []
    for batches in (grouped, per_pair):
        tx = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, eps=1e-6), 10)
        ts = create_state(_tiny_model(), tx)
        step = make_train_step(ts, tx, make_dpo_loss(DPOConfig(sft_weight=0.3), chunk_size=64))
        params, opt_state, history = ts.params, ts.opt_state, []
        for batch in batches:
            params, opt_state, metrics = step(params, opt_state, ts.frozen, to_device(stack_micro([batch]), None))
            history.append(jax.device_get(metrics))
        out.append(history)
    for k, (got, want) in enumerate(zip(*out, strict=True)):
        for name in (*METRICS, "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"step {k}: {name}")


@pytest.mark.slow
def test_two_groups_in_a_row_equal_per_pair_on_meshes(mesh) -> None:
    """Rows of 640 tokens holding two questions' groups each: every pair's log-probs equal its per-pair forward."""
    recs = kc_records()[:9]  # groups Q0-Q3 (3, 2, 1, 3 pairs)
    grouped, per_pair = _loader_batches(recs, 9, max_len=640, buckets=(640,), row_multiple=8)
    assert grouped.seq.input_ids.shape == (8, 640) and list(grouped.group_ids.max(1)[:2]) == [2, 2]
    assert not grouped.group_ids[2:].any()  # padding rows up to the 8 batch ways
    model = _place(_tiny_model(), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logps = jax.jit(lambda prm, batch: preference_logps(nnx.merge(graphdef, prm, rest), batch, chunk_size=64))
    per_pair = pad_to(per_pair, seq_len(per_pair), 16)  # 9 pairs + 7 padding rows: splits 8 ways too
    got = [np.asarray(x) for x in logps(params, sharding.to_device(grouped, mesh))]
    want = [np.asarray(x) for x in logps(params, sharding.to_device(per_pair, mesh))]
    filled, order = got[2] > 0, _slot_order(grouped, per_pair)
    assert int(filled.sum()) == 9
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a[filled], b[order], rtol=1e-5, atol=1e-5)
