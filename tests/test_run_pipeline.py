"""`kt-jax run` end to end on the CI world: killed mid-stage, restarted, finishes without redoing finished stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kt_jax.config import load_config
from kt_jax.errors import ConfigError
from kt_jax.workflow.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
# Smaller than configs/world-ci.yaml's own sizes: this test checks the mechanics, not the method's effect.
SHRINK = ["pretrain.steps=40", "pretrain.probe_max_new_tokens=32", "generate.max_new_tokens=48",
          "sft.train.num_epochs=1", "mesh.fsdp=1"]
# ... and a two-candidate validation search over the SFT learning rate (the DPO section is the same in both, so
# KnowTuning trains once): every SFT-type system trains both, the chosen one continues and answers the test.
SEARCH = ["world.valid_fraction=0.2",
          "search.candidates=[{sft.optim.learning_rate: 0.0003}, {sft.optim.learning_rate: 0.001}]"]


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "kt_jax.cli", "run", "--config", str(ROOT / "configs" / "world-ci.yaml"),
            f"run_dir={run_dir}", *SHRINK, *SEARCH]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_run_resumes_without_redoing_finished_stages(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run_dir / "stages" / "valid_sft@0.json"
    deadline = time.time() + 400
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the first run never finished its sft stage"
    proc.send_signal(signal.SIGKILL)  # now inside a later stage (ka training)
    proc.wait()
    done_before = {p.stem for p in (run_dir / "stages").glob("*.json")}
    assert {"world", "pretrain", "knowledge", "sft@0", "valid_sft@0"} <= done_before
    assert "report" not in done_before and not (run_dir / "report.md").exists()

    out = subprocess.run(_cmd(run_dir), env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    skipped = {s["name"] for s in summary["stages"] if s["skipped"]}
    assert done_before <= skipped
    ran = {s["name"] for s in summary["stages"] if not s["skipped"]}
    assert {"knowtuning@0", "valid_knowtuning@0", "generate_knowtuning", "evaluate"} <= ran
    report = (run_dir / "report.md").read_text()
    for label in ("| SFT |", "| KA-SFT (-KC) |", "| KnowTuning |", "completeness", "meteor"):
        assert label in report
    assert set(summary["chosen"]) == {"sft", "ka", "knowtuning"} and summary["chosen"]["knowtuning"] == "knowtuning@0"
    for name in ("sft", "ka"):
        searched = json.loads((run_dir / "search" / f"{name}.json").read_text())
        scores = [c["validation"]["completeness"] for c in searched["candidates"]]
        assert len(scores) == 2 and summary["chosen"][name] == f"{name}@{searched['chosen']}"
        assert scores[searched["chosen"]] == max(scores)
        assert (run_dir / "train" / f"{name}@1" / "export" / "config.json").exists()
    assert "## Hyperparameters chosen on the validation entities" in report
    for name in ("sft", "ka", "knowtuning"):
        assert (run_dir / "train" / summary["chosen"][name] / "export" / "config.json").exists()
        rows = (run_dir / "predictions" / name / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == len(json.loads((run_dir / "world" / "qa_test.json").read_text()))
    assert "kt-jax run world-ci: done" in out.stdout and "report:" in out.stdout
    # a world run reports its validity checks and each system's paired-bootstrap difference from SFT
    assert set(summary["validity"]) == {"stored", "learned", "power", "determinism"}
    assert all({"value", "threshold", "pass"} <= set(c) for c in summary["validity"].values())
    assert summary["validity"]["determinism"]["pass"] is True
    diff = summary["differences"]["knowtuning"]["completeness"]
    assert diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
    assert "## Validity of the instrument" in report and "## Differences from SFT" in report
    # overview vs narrow questions: counts add up to the test set, means agree with the per-question rows
    world = json.loads((run_dir / "eval" / "world_metrics.json").read_text())
    assert set(summary["by_kind"]["sft"]) == {"overview", "narrow"} and "## By question kind" in report
    for name, kinds in summary["by_kind"].items():
        assert sum(k["questions"] for k in kinds.values()) == len(world["rows"][name])
        narrow = [r for r in world["rows"][name] if r["kind"] == "narrow"]
        assert kinds["narrow"]["stated_per_answer"] == pytest.approx(sum(r["stated"] for r in narrow) / len(narrow))
    assert (run_dir / "eval" / "differences.png").stat().st_size > 0
    assert (run_dir / "config.yaml").exists()


def test_config_errors_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"world-ci\.yaml \(\+ overrides\): unknown key\(s\) sft\.optim\.lr\b"):
        load_config(PipelineConfig, ROOT / "configs" / "world-ci.yaml", ["sft.optim.lr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("systems: [sft, magic]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: systems: unknown \['magic'\]"):
        load_config(PipelineConfig, bad)
    files = tmp_path / "files.yaml"
    files.write_text("train_file: a.json\n")
    with pytest.raises(ConfigError, match="test_file, base_model: required when the config has no world"):
        load_config(PipelineConfig, files)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    from kt_jax.workflow.config import SYSTEMS

    paths = [] if name.startswith("world") else ["base_model=/m", "train_file=/a.json", "test_file=/b.json"]
    cfg = load_config(PipelineConfig, ROOT / "configs" / f"{name}.yaml", paths)
    every = load_config(PipelineConfig, ROOT / "configs" / f"{name}.yaml", [*paths, f"systems=[{','.join(SYSTEMS)}]"])
    assert every.systems == SYSTEMS  # every config accepts every system
    assert "knowtuning" in cfg.systems
    if name.startswith("world"):
        assert cfg.world is not None and cfg.pretrain is not None
    else:
        assert cfg.knowledge.backend == "anthropic" and cfg.sft.lora.rank == 8 and cfg.sft.lora.alpha == 16.0
        assert (cfg.sft.optim.learning_rate, cfg.sft.data.batch_size, cfg.sft.train.num_epochs) == (1e-4, 32, 3.0)
        assert (cfg.dpo.optim.learning_rate, cfg.dpo.data.batch_size, cfg.dpo.train.num_epochs) == (1e-5, 16, 1.0)
        assert (cfg.dpo.dpo.beta, cfg.dpo.dpo.sft_weight, cfg.sft.data.max_len) == (0.1, 0.2, 1024)
