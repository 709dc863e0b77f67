"""Base-model pretraining on a world: packing, the configs, and a short CI-sized run that lowers the loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kt_jax.errors import ConfigError
from kt_jax.world.pretrain import PretrainConfig, WorldPreset, load_preset, pack_rows, pretrain_world

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_pack_rows_segments_targets_and_mask():
    docs = [[1, 10, 11, 2], [1, 20, 2], [1, 30, 31, 32, 2]]
    rows = pack_rows(docs, seq_len=8, rng=np.random.default_rng(0))
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
    import jax.numpy as jnp
    from flax import nnx

    from kt_jax.world.pretrain import build_model, lm_loss

    model = build_model(PretrainConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2), 97)
    rows = pack_rows([[1, 5, 9, 2], [1, 7, 7, 8, 2], [1, 3, 2]], seq_len=16, rng=np.random.default_rng(0))
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    forward = nnx.jit(lambda m, b: (m(b["input_ids"], b["positions"], b["segment_ids"]), lm_loss(m, b)))
    logits, loss = forward(model, batch)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    picked = np.take_along_axis(logp, rows["targets"][..., None], -1)[..., 0]
    want = -(picked * rows["loss_mask"]).sum() / rows["loss_mask"].sum()
    assert float(loss) == pytest.approx(want, rel=1e-5)
