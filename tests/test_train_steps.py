"""SFT/DPO steps: DPO loss vs HF PyTorch log-probs, LoRA trains only adapters, learning on toy sets, meshes, guard."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kt_jax.data.batch import PreferenceBatch, SeqBatch
from kt_jax.data.packing import Segment, pack_arrays
from kt_jax.model.hf import load_pretrained
from kt_jax.model.lora import LoRAConfig, apply_lora
from kt_jax.sharding import make_mesh
from kt_jax.train.config import DPOConfig, OptimConfig, TrainConfig
from kt_jax.train.loop import TrainingDiverged, stack_micro, to_device, train
from kt_jax.train.optimizer import make_optimizer
from kt_jax.train.state import create_state
from kt_jax.train.steps import make_dpo_loss, make_sft_loss, make_train_step

pytestmark = pytest.mark.timeout(300)


def sft_batch(rng: np.random.Generator, rows: int, length: int, vocab: int = 256) -> SeqBatch:
    """A padded SFT batch in the pipeline's format: one segment per row, prompt 3-5 tokens."""
    segs = []
    for _ in range(rows):
        n = int(rng.integers(length // 2, length + 1))
        segs.append([Segment.response(list(rng.integers(3, vocab, n)), int(rng.integers(3, 6)))])
    return pack_arrays(segs, length).batch


def pref_batch(rng: np.random.Generator, rows: int, length: int, vocab: int = 256, pad_rows: int = 0,
               ref: tuple[np.ndarray, np.ndarray] | None = None) -> PreferenceBatch:
    """A preference batch (chosen/rejected rows + reference log-probs); the last `pad_rows` rows are empty."""
    sides = []
    prompts = [list(rng.integers(3, vocab, 4)) for _ in range(rows)]
    for _ in ("chosen", "rejected"):
        segs = [[Segment.response(p + list(rng.integers(3, vocab, int(rng.integers(3, length - 4)))), len(p))]
                for p in prompts]
        segs = segs[: rows - pad_rows] + [[]] * pad_rows
        sides.append(pack_arrays(segs, length).batch)
    rc, rr = ref if ref is not None else (-rng.uniform(20, 40, rows), -rng.uniform(20, 40, rows))
    real = np.arange(rows) < rows - pad_rows
    return PreferenceBatch(*sides, np.asarray(rc, np.float32) * real, np.asarray(rr, np.float32) * real)


class ListIterator:
    """Cycles over fixed host batches; checkpointable like the Grain iterator."""

    def __init__(self, batches: list[SeqBatch | PreferenceBatch]):
        self.batches, self.i = batches, 0

    def __next__(self) -> SeqBatch | PreferenceBatch:
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def get_state(self) -> dict[str, int]:
        return {"i": self.i}

    def set_state(self, state: dict[str, int]) -> None:
        self.i = int(state["i"])


def _hf_logps(path, batch: PreferenceBatch, side: str) -> np.ndarray:
    """Summed masked response log-probs per row in float64 from transformers on the same checkpoint."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    rows: SeqBatch = getattr(batch, side)
    ids, tgt, mask = rows.input_ids, rows.targets, rows.loss_mask
    attn = (rows.segment_ids > 0).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(attn)).logits
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tgt, dtype=torch.long)[..., None])[..., 0].numpy()
    return (logp * mask).sum(1), mask.sum(1)


def test_dpo_step_loss_matches_hf_formula(llama2_dir):
    rng = np.random.default_rng(0)
    batch = pref_batch(rng, rows=4, length=24, pad_rows=1)
    model = load_pretrained(llama2_dir)
    cfg = DPOConfig(beta=0.1, sft_weight=0.2)
    ts = create_state(model, make_optimizer(OptimConfig(learning_rate=1e-3), 10))
    step = make_train_step(ts, make_optimizer(OptimConfig(learning_rate=1e-3), 10), make_dpo_loss(cfg, chunk_size=8))
    _, _, metrics = step(ts.params, ts.opt_state, ts.frozen, to_device(stack_micro([batch]), None))
    pc, nc = _hf_logps(llama2_dir, batch, "chosen")
    pr, _ = _hf_logps(llama2_dir, batch, "rejected")
    rc, rr = batch.ref_chosen_logps.astype(np.float64), batch.ref_rejected_logps.astype(np.float64)
    real = slice(0, 3)  # the padded 4th row weighs nothing
    delta = (pc - rc) - (pr - rr)
    per_row = np.log1p(np.exp(-0.1 * delta[real])) + 0.2 * (-pc[real] / nc[real])
    assert float(metrics["loss"]) == pytest.approx(per_row.mean(), abs=1e-4)
    acc = np.mean((0.1 * (pc - rc))[real] > (0.1 * (pr - rr))[real])
    assert float(metrics["rewards/accuracy"]) == pytest.approx(acc)


def place_on_mesh(model, mesh):
    """Put every parameter of `model` onto the mesh as the rules table says (in place)."""
    from kt_jax.sharding import state_shardings

    state = nnx.state(model)
    placed = jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    return model


def _tiny_model(lora: bool, seed: int = 0, dtype: str = "float32"):
    from kt_jax.model.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, dtype=dtype)
    model = Llama(cfg, nnx.Rngs(seed))
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    return model


def _run(model, loss_fn, batches, steps, tmp_path, lr=3e-3, mesh=None, accum=1, **cfg_kw):
    tx = make_optimizer(OptimConfig(learning_rate=lr, warmup_steps=2), steps)
    ts = create_state(model, tx, mesh)
    step = make_train_step(ts, tx, loss_fn)
    cfg_kw.setdefault("save_every", 10_000)  # only the final checkpoint unless a test asks
    cfg = TrainConfig(grad_accum=accum, tensorboard=False, progress=False, async_checkpoints=False, **cfg_kw)
    res = train(ts, step, ListIterator(batches), cfg=cfg, total_steps=steps, run_dir=tmp_path, mesh=mesh)
    return ts, res


def test_lora_trains_only_adapters_and_sft_loss_falls(tmp_path):
    rng = np.random.default_rng(1)
    batches = [sft_batch(rng, 4, 16) for _ in range(2)]
    model = _tiny_model(lora=True)
    before = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    ts, res = _run(model, make_sft_loss(chunk_size=8), batches, 20, tmp_path, lr=1e-2)
    opt_leaves = [x for x in jax.tree.leaves(ts.opt_state) if getattr(x, "ndim", 0) > 0]
    # adapter moments only, plus the learning-rate schedule's five numbers (optimizer state, not program constants)
    assert {tuple(x.shape) for x in opt_leaves} == {(64, 4), (4, 64), (4, 32), (5,)}
    after = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ts.model()))}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert len(changed) == 2 * 2 * 2  # q and v, A and B, 2 layers: every adapter moved
    assert res.steps == 20 and not res.evals
    losses = _losses(tmp_path)
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.2


def _losses(run_dir) -> list[float]:
    import json

    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(ln)["split"] == "train"]


def test_full_sft_memorises(tmp_path):
    rng = np.random.default_rng(2)
    batches = [sft_batch(rng, 4, 16)]
    _run(_tiny_model(lora=False), make_sft_loss(chunk_size=8), batches, 40, tmp_path, lr=3e-3)
    losses = _losses(tmp_path)
    assert losses[-1] < 0.25 * losses[0] and losses[-1] < 1.5  # from ~ln(256)


def test_dpo_reward_accuracy_rises(tmp_path):
    rng = np.random.default_rng(3)
    batches = [pref_batch(rng, 8, 16) for _ in range(2)]
    # reference = the initial model itself: rewards start at 0 (accuracy 0) and must learn the preference
    model = _tiny_model(lora=True)
    from kt_jax.train.steps import dpo_policy_logps

    for i, b in enumerate(batches):
        pc, pr, _, _ = dpo_policy_logps(model, jax.tree.map(jnp.asarray, b))
        batches[i] = dataclasses.replace(b, ref_chosen_logps=np.asarray(pc), ref_rejected_logps=np.asarray(pr))
    _run(model, make_dpo_loss(DPOConfig(), chunk_size=8), batches, 30, tmp_path, lr=1e-2)
    import json

    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = [r["rewards/accuracy"] for r in rows]
    assert np.mean(acc[:2]) <= 0.5 and np.mean(acc[-4:]) == 1.0
    assert rows[-1]["rewards/margin"] > rows[0]["rewards/margin"] + 0.1


@pytest.mark.slow
def test_loss_identical_on_meshes_1_and_2x4(tmp_path):
    rng = np.random.default_rng(4)
    batches = [pref_batch(rng, 8, 16) for _ in range(3)]
    out = {}
    for name, shape in (("1", (1, 1, 1)), ("2x4", (2, 1, 4))):
        mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        model = _tiny_model(lora=False)
        place_on_mesh(model, mesh)
        ts, _ = _run(model, make_dpo_loss(DPOConfig(), chunk_size=8), batches, 3, tmp_path / name, mesh=mesh,
                     accum=2)
        out[name] = (_losses(tmp_path / name), jax.tree.map(np.asarray, ts.params))
    np.testing.assert_allclose(out["1"][0], out["2x4"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), out["1"][1], out["2x4"][1])


def test_nonfinite_stops_and_keeps_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(5)
    good = [pref_batch(rng, 4, 16) for _ in range(4)]
    bad = pref_batch(rng, 4, 16)
    bad.ref_chosen_logps[0] = np.nan
    with pytest.raises(TrainingDiverged, match=r"step 5.*last good checkpoint: step 4"):
        _run(_tiny_model(lora=True), make_dpo_loss(DPOConfig(), chunk_size=8), [*good, bad], 10, tmp_path,
             save_every=2)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == [2, 4]
    assert math.isfinite(_losses(tmp_path)[-1])


@pytest.mark.slow
def test_grad_accumulation_means_microbatches_and_bf16_step():
    from kt_jax.train.steps import make_eval_step

    rng = np.random.default_rng(6)
    b1, b2 = sft_batch(rng, 4, 16), sft_batch(rng, 4, 12)
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    ts = create_state(_tiny_model(lora=False), tx)
    loss_fn = make_sft_loss(chunk_size=8)
    ev = make_eval_step(ts, loss_fn)
    single = [float(ev(ts.params, ts.frozen, to_device(stack_micro([b]), None))["loss"]) for b in (b1, b2)]
    micro = to_device(stack_micro([b1, b2]), None)  # b2 is zero-padded to T=16
    _, _, m = make_train_step(ts, tx, loss_fn)(ts.params, ts.opt_state, ts.frozen, micro)
    assert float(m["loss"]) == pytest.approx(np.mean(single), abs=1e-5)
    assert float(m["tokens"]) == float((b1.segment_ids > 0).sum() + (b2.segment_ids > 0).sum())
    # bf16 compute with float32 parameters: same loss to bf16 precision, params stay float32
    model16 = _tiny_model(lora=False, dtype="bfloat16")
    ts16 = create_state(model16, tx)
    p16, _, m16 = make_train_step(ts16, tx, loss_fn)(ts16.params, ts16.opt_state, ts16.frozen, micro)
    assert float(m16["loss"]) == pytest.approx(float(m["loss"]), rel=2e-2)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
