"""PEFT adapters: our export loads in peft and matches the merged export; PEFT's own adapters import exactly."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.hf_fixtures import hf_logits
from safetensors.numpy import load_file, save_file

from kt_jax.errors import CheckpointError, ConfigError
from kt_jax.model.hf import load_pretrained, save_pretrained
from kt_jax.model.lora import LoRAConfig, apply_lora, merge_lora
from kt_jax.model.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_adapter_config,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

CFG = LoRAConfig(targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0)


def _ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 12))


def _adapted(src, cfg: LoRAConfig = CFG, mesh=None, seed: int = 3):
    """The kt-jax model of `src` with adapters of `cfg` set to random values (B too, so they matter)."""
    model = apply_lora(load_pretrained(src, mesh=mesh), cfg)
    key = jax.random.key(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        key, sub = jax.random.split(key)
        x = var.get_value()
        var.set_value(jax.device_put(0.05 * jax.random.normal(sub, x.shape, x.dtype), x.sharding))
    return model


def peft_logits(base_dir, adapter_dir, ids: np.ndarray) -> np.ndarray:
    """float32 logits of peft.PeftModel.from_pretrained(HF base, adapter_dir)."""
    import peft
    import torch
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_peft_loads_our_adapter_as_the_merged_export(which, llama2_dir, llama3_dir, tmp_path):
    src = llama2_dir if which == "llama2" else llama3_dir
    model = _adapted(src)
    save_adapter(model, tmp_path / "adapter", CFG, base_model=str(src))
    save_pretrained(merge_lora(model), tmp_path / "merged")
    raw = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (raw["peft_type"], raw["r"], raw["lora_alpha"], raw["target_modules"], raw["base_model_name_or_path"]) == (
        "LORA", 4, 8.0, ["q_proj", "v_proj", "down_proj"], str(src))
    shapes = {k: v.shape for k, v in load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS).items()}
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] == (4, 128 if which == "llama2"
                                                                                     else 160)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (
        64 if which == "llama2" else 32, 4)
    assert len(shapes) == 2 * 3 * 2
    ids = _ids()
    merged = hf_logits(tmp_path / "merged", ids)
    assert np.abs(merged - hf_logits(src, ids)).max() > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(peft_logits(src, tmp_path / "adapter", ids), merged, atol=1e-4)


def test_round_trip_is_exact_and_keeps_shardings(mesh, llama3_dir, tmp_path):
    model = _adapted(llama3_dir, mesh=mesh)
    save_adapter(model, tmp_path / "adapter", CFG, base_model=str(llama3_dir))
    cfg = read_adapter_config(tmp_path / "adapter")
    assert cfg == CFG
    fresh = load_adapter(apply_lora(load_pretrained(llama3_dir, mesh=mesh), cfg, seed=7), tmp_path / "adapter")
    ours = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    theirs = dict(nnx.to_flat_state(nnx.state(fresh, nnx.LoRAParam)))
    assert len(ours) == 12 and len(theirs) == 12
    for path, var in ours:
        a, b = var.get_value(), theirs[path].get_value()
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim)
    ids = _ids()
    np.testing.assert_array_equal(np.asarray(fresh(ids)), np.asarray(model(ids)))


def test_adapter_saved_by_peft_imports_exactly(llama2_dir, tmp_path):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(llama2_dir, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"],
                                                   lora_dropout=0.05, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        expected = pm.eval()(torch.tensor(ids)).logits.numpy()
    cfg = read_adapter_config(tmp_path / "adapter")
    assert cfg == LoRAConfig(targets=("k_proj", "up_proj"), rank=2, alpha=6.0)
    assert cfg.scale == pm.base_model.model.model.layers[0].self_attn.k_proj.scaling["default"]
    model = load_adapter(apply_lora(load_pretrained(llama2_dir), cfg), tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4)
    stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.up_proj.lora_b.get_value()),
                                  stored["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].T)


@pytest.fixture()
def adapter_dir(llama2_dir, tmp_path):
    return save_adapter(_adapted(llama2_dir), tmp_path / "adapter", CFG, base_model=str(llama2_dir))


def test_mismatched_rank_or_targets_are_refused(adapter_dir):
    file = re.escape(str(adapter_dir / ADAPTER_CONFIG))
    with pytest.raises(ConfigError, match=rf"{file}: r=4 but lora\.rank=8"):
        check_adapter_config(adapter_dir, LoRAConfig(targets=CFG.targets, rank=8, alpha=8.0))
    with pytest.raises(ConfigError, match=rf"{file}: target_modules=.*down_proj.* but lora\.targets="):
        check_adapter_config(adapter_dir, LoRAConfig(rank=4, alpha=8.0))
    with pytest.raises(ConfigError, match=rf"{file}: lora_alpha=8.0 but lora\.alpha=16.0"):
        check_adapter_config(adapter_dir, LoRAConfig(targets=CFG.targets, rank=4, alpha=16.0))
    assert check_adapter_config(adapter_dir, CFG) == CFG


def test_unsupported_config_and_bad_tensors_are_refused(adapter_dir, llama2_dir):
    cfg_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    cfg_re, weights_re = re.escape(str(cfg_file)), re.escape(str(weights))
    good = json.loads(cfg_file.read_text())
    for key, value in (("use_rslora", True), ("use_dora", True), ("bias", "all"), ("peft_type", "IA3"),
                       ("target_modules", "all-linear"), ("rank_pattern", {"q_proj": 2})):
        cfg_file.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ConfigError, match=rf"{cfg_re}: .*{key}"):
            read_adapter_config(adapter_dir)
    cfg_file.write_text(json.dumps(good))
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    model = apply_lora(load_pretrained(llama2_dir), CFG)
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(CheckpointError, match=rf"{weights_re}: missing tensor\(s\): {key}"):
        load_adapter(model, adapter_dir)
    save_file({**tensors, key: tensors[key][:2]}, weights)
    with pytest.raises(CheckpointError, match=rf"{weights_re}: tensor {key} has shape \(2, 64\)"):
        load_adapter(model, adapter_dir)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": tensors[key]}, weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*lm_head"):
        load_adapter(model, adapter_dir)


def test_train_job_checks_init_adapter_before_loading(adapter_dir, llama2_dir, tmp_path):
    from kt_jax.train.job import TrainJobConfig, run_training

    job = TrainJobConfig(model=str(llama2_dir), train_file=str(tmp_path / "absent.jsonl"), kind="kc",
                         output_dir=str(tmp_path / "out"), init_adapter=str(adapter_dir), lora=LoRAConfig(rank=4))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(adapter_dir / ADAPTER_CONFIG))}: target_modules="):
        run_training(job)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="init_adapter: a LoRA adapter needs finetuning: lora"):
        TrainJobConfig(model="m", train_file="t", output_dir="o", init_adapter=str(adapter_dir),
                       finetuning="full").validate()
