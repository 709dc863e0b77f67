"""Typed YAML configs with dotted overrides."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from kt_jax.config import config_hash, load_config, parse_overrides
from kt_jax.errors import ConfigError


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass
class Run:
    name: str = "x"
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)
    modules: tuple[str, ...] = ("q_proj", "v_proj")
    model: str | None = None


def test_yaml_and_overrides(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: a\noptim:\n  lr: 1\nmodules: [q_proj]\n")
    cfg = load_config(Run, f, ["optim.schedule=constant", "steps=3", "model=/m"])
    assert cfg == Run(name="a", steps=3, optim=Optim(lr=1.0, schedule="constant"), modules=("q_proj",), model="/m")
    assert config_hash(cfg) == config_hash(load_config(Run, f, ["optim.schedule=constant", "steps=3", "model=/m"]))
    assert config_hash(cfg) != config_hash(Run())


def test_errors_name_key_and_file(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key\(s\) optim\.lrr; valid keys here: lr, schedule"):
        load_config(Run, f)
    with pytest.raises(ConfigError, match=r"steps: expected int, got 'many'"):
        load_config(Run, None, ["steps=many"])
    with pytest.raises(ConfigError, match=r"optim\.schedule: 'linear' is not one of"):
        load_config(Run, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="must look like"):
        parse_overrides(["steps"])


def test_override_merges_or_replaces_a_mapping(tmp_path) -> None:
    from kt_jax.workflow.config import PipelineConfig

    f = tmp_path / "c.yaml"
    f.write_text("train_file: a\ntest_file: b\nbase_model: c\n"
                 "knowledge:\n  backend: anthropic\n  backend_options: {model: m, api_key_env: K}\n")
    merged = load_config(PipelineConfig, f, ["knowledge.backend=offline", "knowledge.backend_options={batch: true}"])
    assert merged.knowledge.backend_options == {"model": "m", "api_key_env": "K", "batch": True}
    replaced = load_config(PipelineConfig, f, ["knowledge.backend=offline", "knowledge.backend_options:={}"])
    assert replaced.knowledge.backend == "offline" and replaced.knowledge.backend_options == {}
    swapped = load_config(PipelineConfig, f, ["knowledge.backend_options:={model: other}"])
    assert swapped.knowledge.backend_options == {"model": "other"}
    assert load_config(Run, None, ["optim:={lr: 2}"]).optim == Optim(lr=2.0)  # a whole section replaced
    with pytest.raises(ConfigError, match="no key"):
        load_config(Run, None, [":=3"])
