"""LoRA surgery: identity at init, adapters-off = base, merge + HF export matches kt-jax with the adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.hf_fixtures import hf_logits

from kt_jax.errors import ConfigError
from kt_jax.model.hf import load_pretrained, save_pretrained
from kt_jax.model.lora import LoRAConfig, LoRALinear, apply_lora, has_lora, lora_disabled, merge_lora, trainable_filter


def _randomise_adapters(model, seed: int = 3) -> None:
    key = jax.random.key(seed)
    for _path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        key, sub = jax.random.split(key)
        x = var.get_value()
        var.set_value(jax.device_put(0.05 * jax.random.normal(sub, x.shape, x.dtype), x.sharding))


def _ids() -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)), jnp.int32)


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_merge_export_matches_hf(which, llama2_dir, llama3_dir, tmp_path):
    src = llama2_dir if which == "llama2" else llama3_dir
    model = load_pretrained(src)
    ids = _ids()
    base = np.asarray(model(ids))
    apply_lora(model, LoRAConfig(targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0))
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    np.testing.assert_allclose(np.asarray(model(ids)), base, atol=1e-6)  # B = 0: identity at init
    _randomise_adapters(model)
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - base).max() > 1e-2
    with lora_disabled(model):
        np.testing.assert_allclose(np.asarray(model(ids)), base, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(ids)), adapted, atol=0)  # flag restored
    merge_lora(model)
    assert not has_lora(model)
    np.testing.assert_allclose(np.asarray(model(ids)), adapted, atol=1e-4)
    save_pretrained(model, tmp_path / "merged")
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", np.asarray(ids)), adapted, atol=1e-4)


def test_trainable_filter_holds_only_adapters(llama2_dir):
    model = load_pretrained(llama2_dir)
    apply_lora(model, LoRAConfig())
    trainable = nnx.to_flat_state(nnx.state(model, trainable_filter(True)))
    names = {"/".join(map(str, p)) for p, _ in trainable}
    assert len(names) == 2 * 2 * model.config.num_layers
    assert all(n.endswith(("lora_a", "lora_b")) and ("q_proj" in n or "v_proj" in n) for n in names)
    shapes = {tuple(v.get_value().shape) for _, v in trainable}
    assert shapes == {(64, 8), (8, 64)}


def test_adapters_follow_the_mesh(llama3_dir):
    from kt_jax.sharding import make_mesh

    mesh = make_mesh(2, 1, 4, devices=jax.devices()[:8])
    model = load_pretrained(llama3_dir, mesh=mesh)
    apply_lora(model, LoRAConfig())
    v = model.layers[0].self_attn.v_proj
    assert v.lora_b.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    assert v.lora_a.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"lora\.targets"):
        LoRAConfig(targets=("qproj",)).validate()
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0).validate()
