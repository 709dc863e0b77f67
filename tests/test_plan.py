"""kt-jax plan: XLA's compiled memory/cost analysis of the real train steps on abstract shapes (tiny Llama)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.hf_fixtures import LLAMA2_TINY

from kt_jax import cli
from kt_jax.data.batch import SeqBatch, Task
from kt_jax.errors import ConfigError
from kt_jax.plan import (
    ACCELERATORS,
    MODEL_PRESETS,
    Accelerator,
    Plan,
    hf_config,
    load_run_config,
    plan_scoring,
    plan_train_step,
)
from kt_jax.sharding import make_mesh
from kt_jax.train.job import TuneConfig

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA2_TINY}
KEYS = {"program", "tokens", "arguments", "outputs", "aliased", "temporaries", "total", "flops_per_device",
        "flops_total", "share_of_memory", "arguments_share", "verdict", "compile_seconds"}


def _tune(finetuning: str = "full", remat: bool = False, batch: int = 8, length: int = 64) -> TuneConfig:
    from kt_jax.config import from_dict

    return from_dict(TuneConfig, {"finetuning": finetuning, "data": {"batch_size": batch, "max_len": length},
                                  "train": {"remat": remat, "compute_dtype": "float32"}}, "test")


@pytest.fixture(scope="module")
def full_sft_plan() -> Plan:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    step, trained = plan_train_step(TINY, _tune(), Task.SFT, mesh, "tiny")
    scoring = plan_scoring(TINY, 64, "float32", mesh, "tiny")
    return Plan("tiny", trained, {"sft": trained}, dict(mesh.shape), "cpu", ACCELERATORS["v5e"], (step, scoring))


def test_table_has_every_key_and_positive_numbers(full_sft_plan: Plan) -> None:
    rows = full_sft_plan.table()
    assert [r["program"] for r in rows] == ["sft", "scoring"]
    for row in rows:
        assert set(row) == KEYS
        for key in ("tokens", "arguments", "outputs", "temporaries", "total", "flops_per_device"):
            assert row[key] > 0, (row["program"], key)
        assert row["verdict"] == "fits"
    text = full_sft_plan.render()
    assert "sft" in text and "scoring" in text and "order-of-magnitude" in text


def test_flops_match_six_n_d(full_sft_plan: Plan) -> None:
    """Full fine-tuning without remat: forward 2ND + backward 4ND, plus attention (small at T=64)."""
    step = full_sft_plan.steps[0]
    expected = 6 * full_sft_plan.num_params * step.tokens
    assert 0.8 < step.flops / expected < 1.6, step.flops / expected
    # scoring is a forward pass: about 2ND
    scoring = full_sft_plan.steps[1]
    assert 0.7 < scoring.flops / (2 * full_sft_plan.num_params * scoring.tokens) < 1.6


def test_verdict_flips_when_the_accelerator_is_too_small(full_sft_plan: Plan) -> None:
    total = full_sft_plan.steps[0].total_bytes
    small = dataclasses.replace(full_sft_plan, accelerator=Accelerator("small", total - 1, 1e12))
    tight = dataclasses.replace(full_sft_plan, accelerator=Accelerator("tight", int(total / 0.9), 1e12))
    big = dataclasses.replace(full_sft_plan, accelerator=Accelerator("big", 100 * total, 1e12))
    assert small.verdict(small.steps[0]) == "does not fit"
    assert tight.verdict(tight.steps[0]) == "tight"
    assert big.verdict(big.steps[0]) == "fits"


def _real_step(llama2_dir, mesh, tune: TuneConfig):
    """The step `run_training` builds, on the real tiny checkpoint, after one real update: (step, args)."""
    from kt_jax.model.hf import load_pretrained
    from kt_jax.model.lora import apply_lora
    from kt_jax.train.loop import to_device
    from kt_jax.train.optimizer import make_optimizer
    from kt_jax.train.state import create_state
    from kt_jax.train.steps import make_sft_loss, make_train_step

    model = load_pretrained(llama2_dir, mesh=mesh, dtype=jnp.float32, param_dtype=jnp.float32)
    if tune.finetuning == "lora":
        apply_lora(model, tune.lora)
    tx = make_optimizer(tune.optim, total_steps=1000)
    ts = create_state(model, tx, mesh)
    step = make_train_step(ts, tx, make_sft_loss(tune.train.chunk_size))
    shape = (1, tune.data.batch_size, tune.data.max_len)
    ids = np.ones(shape, np.int32)
    micro = to_device(SeqBatch(ids, ids, np.ones(shape, np.float32), np.zeros(shape, np.int32) + np.arange(
        shape[-1], dtype=np.int32), ids), mesh)
    params, opt_state, metrics = step(ts.params, ts.opt_state, ts.frozen, micro)
    assert np.isfinite(float(metrics["loss"]))
    return step, (params, opt_state, ts.frozen, micro)


@pytest.mark.slow
@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_plan_matches_the_real_step_after_it_ran(llama2_dir, mesh, finetuning: str) -> None:
    """Abstract shapes compile to the program training runs: same per-device bytes and FLOPs; the live state
    on a device after a real step is what the plan counts as arguments."""
    tune = _tune(finetuning)
    planned, _ = plan_train_step(TINY, tune, Task.SFT, mesh, "tiny")
    step, args = _real_step(llama2_dir, mesh, tune)
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    real_total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
        mem.temp_size_in_bytes
    assert planned.total_bytes == real_total  # measured here: exactly equal on every mesh, full and LoRA
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert planned.flops == pytest.approx(cost["flops"], rel=1e-6)
    dev = mesh.devices.flat[0]
    live = sum(s.data.nbytes for x in jax.tree.leaves(args) for s in x.addressable_shards if s.device == dev)
    assert planned.argument_bytes == live


def test_hf_config_presets_and_errors(tmp_path) -> None:
    assert hf_config("", "llama2-7b") == ("llama2-7b", MODEL_PRESETS["llama2-7b"])
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert hf_config(str(tmp_path), None)[1]["hidden_size"] == 64
    with pytest.raises(ConfigError, match=r"config\.json: not found"):
        hf_config(str(tmp_path / "missing"), None)
    with pytest.raises(ConfigError, match="not one of"):
        hf_config("", "llama9")
    from kt_jax.model.hf import config_from_hf

    assert 6.5e9 < config_from_hf(MODEL_PRESETS["llama2-7b"], "p").num_params() < 6.9e9  # 6.74 B
    assert 7.9e9 < config_from_hf(MODEL_PRESETS["llama3-8b"], "p").num_params() < 8.1e9  # 8.03 B


def test_load_run_config_needs_no_data_paths() -> None:
    cfg = load_run_config("configs/dolly-llama2-7b.yaml", ["sft.data.batch_size=4"], "llama2-7b")
    assert cfg.base_model == "llama2-7b" and cfg.sft.data.batch_size == 4


@pytest.mark.slow
def test_cli_plan_prints_the_table(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    small = [f"{s}.data.max_len=64" for s in ("sft", "dpo")] + [f"{s}.data.batch_size=8" for s in ("sft", "dpo")]
    argv = ["plan", "--config", "configs/dolly-llama2-7b.yaml", "--devices", "8", "--accelerator", "h100",
            f"base_model={tmp_path}", "knowledge.max_len=64", *small]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "8 cpu devices" in out and "NVIDIA H100" in out
    for program in ("sft", "dpo", "scoring"):
        assert f"\n{program} " in out
    assert cli.main(["plan", "--config", "configs/dolly-llama2-7b.yaml", "--model-config", "llama2-7b",
                     "--devices", "64"]) == 2
    assert "only 8 cpu devices" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_plan_in_a_fresh_process_sets_the_cpu_devices_and_says_so(tmp_path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "import sys; from kt_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
    argv = ["plan", "--config", "configs/dolly-llama2-7b.yaml", "--devices", "2", "--json", f"base_model={tmp_path}",
            "knowledge.max_len=32", *[f"{s}.data.{k}={v}" for s in ("sft", "dpo") for k, v in (("max_len", 32),
                                                                                               ("batch_size", 2))]]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(done.stdout)
    assert table["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and table["platform"] == "cpu"
    assert [r["program"] for r in table["rows"]] == ["sft", "dpo", "scoring"]
    assert "set jax_num_cpu_devices=2" in done.stderr and "concurrency_optimized_scheduler=false" in done.stderr
