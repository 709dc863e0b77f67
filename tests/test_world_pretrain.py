"""Base-model pretraining on a world: packing, the configs, the batch order, a short CI-sized run that lowers the
loss, and a resume after an interruption that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from kt_jax.config import apply_overrides, from_dict
from kt_jax.errors import ConfigError
from kt_jax.world.pretrain import LMBatches, PretrainConfig, WorldPreset, pack_rows, pretrain_world

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_preset(path: Path, overrides: tuple[str, ...] = ()) -> WorldPreset:
    """The `world:` and `pretrain:` sections of a config file (+ dotted overrides), as the run config reads them."""
    data = yaml.safe_load(path.read_text())
    data = apply_overrides({k: v for k, v in data.items() if k in ("world", "pretrain")}, overrides)
    return from_dict(WorldPreset, data, str(path))


def test_pack_rows_segments_targets_and_mask():
    docs = [[1, 10, 11, 2], [1, 20, 2], [1, 30, 31, 32, 2]]
    rows = pack_rows(docs, seq_len=8, rng=np.random.default_rng(0)).as_dict()
    n_tokens = int((rows["segment_ids"] > 0).sum())
    assert n_tokens == 12 and rows["loss_mask"].sum() == 12 - 3  # one target fewer than tokens per doc
    for r in range(len(rows["input_ids"])):
        for s in set(rows["segment_ids"][r].tolist()) - {0}:
            where = np.flatnonzero(rows["segment_ids"][r] == s)
            ids = rows["input_ids"][r, where].tolist()
            assert ids in docs
            assert rows["positions"][r, where].tolist() == list(range(len(ids)))
            assert rows["targets"][r, where[:-1]].tolist() == ids[1:]
            assert rows["loss_mask"][r, where[-1]] == 0.0
    assert sorted(tuple(d) for d in docs) == sorted(
        tuple(rows["input_ids"][r, rows["segment_ids"][r] == s].tolist())
        for r in range(len(rows["input_ids"])) for s in set(rows["segment_ids"][r].tolist()) - {0})


@pytest.mark.parametrize("name", ["world-tiny.yaml", "world-ci.yaml"])
def test_presets_load(name):
    preset = load_preset(CONFIGS / name)
    assert isinstance(preset, WorldPreset) and preset.pretrain.steps > 0
    assert preset.world.num_artefacts <= preset.world.num_people


def test_preset_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world:\n  num_peple: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*world.num_peple"):
        load_preset(bad)
    with pytest.raises(ConfigError, match="log_every"):
        PretrainConfig(log_every=32)


@pytest.mark.slow
def test_ci_pretraining_lowers_loss_and_saves_a_hf_model(tmp_path):
    preset = load_preset(CONFIGS / "world-ci.yaml", ["pretrain.steps=40", "pretrain.probe_max_new_tokens=24"])
    stats = pretrain_world(preset, tmp_path)
    assert stats["final_loss"] < 0.6 * stats["first_loss"], stats["losses"]
    assert stats["probe"]["answers"] == len((tmp_path / "probe.jsonl").read_text().splitlines())
    assert json.loads((tmp_path / "pretrain.json").read_text())["steps"] == 40
    import torch
    import transformers

    from kt_jax.data.tokenizer import load_tokenizer

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tok = load_tokenizer(tmp_path / "model")
    ids = [tok.bos_id, *tok.encode("Tell me about")]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), tok.vocab_size) and torch.isfinite(logits).all()


def test_lm_loss_matches_a_float64_log_softmax():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kt_jax.train.steps import sft_loss
    from kt_jax.world.pretrain import build_model

    model = build_model(PretrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), 97)
    packed = pack_rows([[1, 5, 9, 2], [1, 7, 7, 8, 2], [1, 3, 2]], seq_len=16, rng=np.random.default_rng(0))
    rows = packed.as_dict()
    batch = jax.tree.map(jnp.asarray, packed)
    forward = nnx.jit(lambda m, b: (m(b.input_ids, b.positions, b.segment_ids), sft_loss(m, b)[0]))
    logits, loss = forward(model, batch)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    picked = np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
    want = -(picked * rows["loss_mask"]).sum() / rows["loss_mask"].sum()
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_lm_batches_follow_the_packed_epochs_and_resume_from_a_step():
    docs = [[1, *range(10, 10 + n), 2] for n in (3, 9, 5, 14, 2, 7, 11, 4, 6, 8)]
    cfg = PretrainConfig(seq_len=16, batch_size=3, seed=5)
    rng = np.random.default_rng(5)
    epochs = [pack_rows(docs, 16, rng).as_dict() for _ in range(9)]
    want, e, cursor = [], 0, 0  # rows taken in order; a new epoch is packed when the current one runs out
    for _ in range(9):
        if cursor + 3 > len(epochs[e]["input_ids"]):
            e, cursor = e + 1, 0
        want.append(epochs[e]["input_ids"][np.arange(cursor, cursor + 3) % len(epochs[e]["input_ids"])])
        cursor += 3
    got = LMBatches(docs, cfg)
    assert all(np.array_equal(next(got).input_ids, w) for w in want)
    assert got.get_state() == {"step": 9}
    resumed = LMBatches(docs, cfg)
    resumed.set_state({"step": 4})
    assert all(np.array_equal(next(resumed).input_ids, w) for w in want[4:])
    halves = [next(LMBatches(docs, cfg, i, 3)).input_ids for i in range(3)]
    assert np.array_equal(np.concatenate(halves), want[0])
    with pytest.raises(ConfigError, match="batch_size"):
        LMBatches(docs, cfg, 0, 2)


def _random_docs(n: int = 40, vocab: int = 97) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, vocab, rng.integers(4, 20)).tolist(), 2] for _ in range(n)]


class _Interrupted(Exception):
    pass


class _Counting:
    """`LMBatches` that counts the batches taken and raises `_Interrupted` at batch `stop_at`."""

    def __init__(self, inner: LMBatches, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.taken = inner, stop_at, 0
        self.get_state, self.set_state = inner.get_state, inner.set_state

    def __iter__(self):
        return self

    def __next__(self):
        if self.stop_at is not None and self.taken == self.stop_at:
            raise _Interrupted
        self.taken += 1
        return next(self.inner)


@pytest.mark.slow  # ~20 s: three short runs, a checkpoint every step
def test_interrupted_pretraining_resumes_to_the_same_losses_and_params(tmp_path):
    import jax

    from kt_jax.world.pretrain import build_model, train_lm

    docs = _random_docs()
    cfg = PretrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seq_len=32, batch_size=4,
                         steps=10, warmup_steps=2, log_every=3)
    model, want = train_lm(build_model(cfg, 97), _Counting(LMBatches(docs, cfg)), cfg, tmp_path / "whole")
    with pytest.raises(_Interrupted):
        train_lm(build_model(cfg, 97), _Counting(LMBatches(docs, cfg), stop_at=7), cfg, tmp_path / "cut")
    data = _Counting(LMBatches(docs, cfg))
    resumed, got = train_lm(build_model(cfg, 97), data, cfg, tmp_path / "cut")
    assert data.taken < cfg.steps and data.inner.get_state() == {"step": cfg.steps}  # it resumed mid-run
    assert got == want and len(got) == cfg.steps
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(model), nnx.state(resumed))
    assert all(jax.tree.leaves(same))


@pytest.mark.slow
def test_pretraining_on_a_mesh_shards_the_params_and_matches_one_device(tmp_path):
    import jax

    from kt_jax.sharding import make_mesh
    from kt_jax.world.pretrain import build_model, train_lm

    docs = _random_docs()
    cfg = PretrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, seq_len=32, batch_size=8,
                         steps=4, warmup_steps=2, log_every=2)
    mesh = make_mesh(2, 4, 1, devices=jax.devices()[:8])
    one, want = train_lm(build_model(cfg, 97), LMBatches(docs, cfg), cfg, tmp_path / "one")
    sharded, got = train_lm(build_model(cfg, 97, mesh), LMBatches(docs, cfg), cfg, tmp_path / "mesh", mesh=mesh)
    embed = sharded.embed_tokens.get_value()
    assert embed.sharding.mesh == mesh and not embed.sharding.is_fully_replicated
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(sharded)), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_checkpoints_are_kept_for_the_same_training_only(tmp_path):
    import dataclasses

    from kt_jax.world.pretrain import _run_dir

    docs, cfg = _random_docs(), PretrainConfig()
    first = _run_dir(tmp_path, cfg, docs)
    first.mkdir()
    assert _run_dir(tmp_path, dataclasses.replace(cfg, probe_max_new_tokens=7, log_every=5), docs) == first
    assert first.exists()  # a probe-only change reuses the trained checkpoints
    other = _run_dir(tmp_path, dataclasses.replace(cfg, lr=1e-3), docs)
    assert other != first and not first.exists()  # another training starts afresh
    assert _run_dir(tmp_path, cfg, docs[1:]) not in (first, other)
