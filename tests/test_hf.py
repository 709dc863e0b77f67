"""HF checkpoint round trip and the documented errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.hf_fixtures import hf_logits
from safetensors.numpy import load_file, save_file

from kt_jax.errors import CheckpointError
from kt_jax.model.hf import load_pretrained, save_pretrained


def _tensors(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("which", ["llama2_dir", "llama3_dir"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(which, tmp_path, request) -> None:
    src = request.getfixturevalue(which)
    out = save_pretrained(load_pretrained(src), tmp_path / "out")
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after)
    for name, array in before.items():
        assert after[name].dtype == array.dtype and np.array_equal(after[name], array), name
    ids = np.arange(30, dtype=np.int32).reshape(2, 15) * 7 % 256
    np.testing.assert_array_equal(hf_logits(out, ids), hf_logits(src, ids))


def test_save_sharded_and_bf16(llama2_dir, tmp_path) -> None:
    model = load_pretrained(llama2_dir)
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = load_pretrained(out)
    ids = jnp.asarray(np.arange(20, dtype=np.int32)[None])
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(model(ids)))
    bf16 = save_pretrained(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(a.dtype.name == "bfloat16" for a in _tensors(bf16).values())
    assert np.abs(hf_logits(bf16, np.asarray(ids)) - np.asarray(model(ids))).max() < 0.5


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_error_missing_config(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_pretrained(tmp_path)


def test_error_unsupported_architecture(llama2_dir, tmp_path) -> None:
    path = _copy(llama2_dir, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture MistralForCausalLM"):
        load_pretrained(path)


def test_error_no_weights(llama2_dir, tmp_path) -> None:
    path = _copy(llama2_dir, tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin: convert"):
        load_pretrained(path)


def test_error_missing_and_unexpected_tensors(llama2_dir, tmp_path) -> None:
    path = _copy(llama2_dir, tmp_path / "m")

    def edit(t):
        t["model.layers.1.extra.weight"] = t.pop("model.layers.1.mlp.up_proj.weight")

    _rewrite_tensors(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "unexpected tensors: model.layers.1.extra.weight" in str(err.value)


def test_error_shape_mismatch(llama2_dir, tmp_path) -> None:
    path = _copy(llama2_dir, tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \(65,\)"):
        load_pretrained(path)


def test_error_index_names_missing_shard(tmp_path, llama2_dir) -> None:
    out = save_pretrained(load_pretrained(llama2_dir), tmp_path / "s", max_shard_bytes=60_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {victim.name}, which does not exist"):
        load_pretrained(out)


def test_config_v4_and_v5_rope_keys_agree(llama3_dir, tmp_path) -> None:
    """transformers 4.x (top-level rope_theta + rope_scaling) and 5.x (rope_parameters) give one model."""
    path = _copy(llama3_dir, tmp_path / "v4")
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (path / "config.json").write_text(json.dumps(cfg))
    ids = jnp.asarray(np.arange(40, dtype=np.int32)[None] % 256)
    np.testing.assert_array_equal(np.asarray(load_pretrained(path)(ids)), np.asarray(load_pretrained(llama3_dir)(ids)))
    assert load_pretrained(path).config.rope_scaling_dict["rope_type"] == "llama3"
