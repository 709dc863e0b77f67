"""`kt-jax run`'s fact scoring and reference log-probs run on the configured mesh, in the configured compute dtype."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from flax import nnx
from test_shipped_configs import TEST_ROWS, TRAIN_ROWS, _rows, _tiny_base

from kt_jax.config import load_config
from kt_jax.sharding import batch_sharding, state_shardings
from kt_jax.workflow.config import PipelineConfig
from kt_jax.workflow.stages import Pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_knowledge_scoring_and_reference_use_the_run_mesh_and_dtype(tmp_path, monkeypatch) -> None:
    import json

    import kt_jax.inference.scoring as scoring
    import kt_jax.model.hf as hf

    rows = _rows("dolly", tmp_path)[: TRAIN_ROWS // 2 + TEST_ROWS]
    (tmp_path / "train.json").write_text(json.dumps(rows[:-TEST_ROWS]))
    (tmp_path / "test.json").write_text(json.dumps(rows[-TEST_ROWS:]))
    base = _tiny_base("dolly-llama2", rows, tmp_path / "base")
    cfg = load_config(PipelineConfig, ROOT / "configs" / "dolly-llama2-7b.yaml", [
        f"run_dir={tmp_path / 'run'}", f"base_model={base}", f"train_file={tmp_path / 'train.json'}",
        f"test_file={tmp_path / 'test.json'}", "knowledge.backend=offline", "knowledge.backend_options:={}",
        "knowledge.max_len=256", "dpo.data.max_len=256", "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4",
        "sft.train.compute_dtype=bfloat16", "dpo.train.compute_dtype=float32"])
    loads: list[tuple[str, object]] = []
    batches: list[tuple[str, object]] = []
    phase = {"now": ""}
    real_load, real_put = hf.load_pretrained, scoring.to_device

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loads.append((phase["now"], model, kwargs.get("mesh")))
        return model

    def put(tree, mesh, **kwargs):
        out = real_put(tree, mesh, **kwargs)
        batches.append((phase["now"], out))
        return out

    monkeypatch.setattr(hf, "load_pretrained", load)
    monkeypatch.setattr(scoring, "to_device", put)
    pipe = Pipeline(cfg)
    pipe.inputs()
    phase["now"] = "knowledge"
    pipe.knowledge()
    phase["now"] = "reference"
    pipe.reference()

    mesh = pipe.mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert [p for p, _, _ in loads] == ["knowledge", "reference"]
    for stage, model, used_mesh in loads:
        assert used_mesh is mesh, stage
        expected = {"knowledge": "bfloat16", "reference": "float32"}[stage]  # sft's / dpo's compute dtype
        assert model.config.dtype == expected, stage
        state = nnx.state(model)
        want = state_shardings(state, mesh)
        for (path, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want), strict=True):
            got = var.get_value().sharding
            assert got.is_equivalent_to(sharding, var.get_value().ndim), (stage, path, got, sharding)
        assert any(len(set(s.spec) - {None}) for _, s in nnx.to_flat_state(want))  # tensor-parallel params exist
    for stage in ("knowledge", "reference"):
        seen = [b for p, b in batches if p == stage]
        assert seen, f"{stage}: scoring sent no batch to the devices"
        for tree in seen:
            for leaf in jax.tree.leaves(tree):
                assert leaf.sharding.is_equivalent_to(batch_sharding(mesh, leaf.ndim), leaf.ndim), stage
