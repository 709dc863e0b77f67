"""Multi-seed runs (workflow.replicate) and the validation search's configs (workflow.search), without training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kt_jax.config import load_config
from kt_jax.errors import ConfigError
from kt_jax.workflow.config import PipelineConfig
from kt_jax.workflow.replicate import combine, seed_config, write_replicate_report
from kt_jax.workflow.search import SearchConfig, search_table

CI = "configs/world-ci.yaml"


def test_seed_config_moves_every_seed_and_the_run_directory() -> None:
    cfg = load_config(PipelineConfig, CI, ["seeds=[3, 4]", "run_dir=/tmp/rep"])
    one = seed_config(cfg, 4)
    assert one.seeds == () and one.run_dir == "/tmp/rep/seed4" and one.name == "world-ci-seed4"
    assert (one.world.seed, one.pretrain.seed, one.knowledge.seed, one.sft.train.seed, one.dpo.train.seed) == (4,) * 5
    assert one.sft.optim == cfg.sft.optim and one.world.num_people == cfg.world.num_people
    with pytest.raises(ConfigError, match="distinct seeds"):
        load_config(PipelineConfig, CI, ["seeds=[1, 1]"])


def _rows(values: list[float]) -> list[dict]:
    return [{"entity_id": f"e{i}", "completeness": v, "factuality": 1.0, "logicality": 1.0, "recall": v,
             "recalled": 1, "gold": 1, "stated": 1, "correct": 1, "wrong": 0, "hallucinated": 0, "off_target": False,
             "kind": "overview" if i % 4 == 0 else "narrow"} for i, v in enumerate(values)]


def test_combine_pools_seeds_and_keeps_each_seed(tmp_path) -> None:
    rng = np.random.default_rng(0)
    per_seed = {}
    for seed, shift in ((0, 0.1), (1, 0.3)):
        base = rng.uniform(0, 0.6, 40)
        rows = {"sft": _rows(list(base)), "knowtuning": _rows(list(base + shift)), "base": _rows([0.0] * 40)}
        (tmp_path / f"seed{seed}" / "eval").mkdir(parents=True)
        (tmp_path / f"seed{seed}" / "eval" / "world_metrics.json").write_text(json.dumps({"rows": rows}))
        diff = {"completeness": {"mean": shift, "ci_low": shift - 0.01, "ci_high": shift + 0.01}}
        per_seed[seed] = {"metrics": {"sft": {"completeness": float(base.mean()), "meteor": 0.5},
                                      "knowtuning": {"completeness": float(base.mean() + shift)}},
                          "differences": {"knowtuning": diff},
                          "validity": {"stored": {"value": 0.95, "threshold": 0.9, "pass": True}}, "questions": 40}
    out = combine(tmp_path, per_seed)
    pooled = out["pooled_differences"]["knowtuning"]["completeness"]
    assert pooled["mean"] == pytest.approx(0.2)  # 80 questions: half +0.1, half +0.3
    assert pooled["ci_low"] <= 0.2 <= pooled["ci_high"]
    agg = out["differences"]["knowtuning"]["completeness"]["mean"]
    assert agg["mean"] == pytest.approx(0.2) and agg["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert "meteor" not in out["metrics"]["sft"]  # only the world metrics are aggregated
    summary = {"seeds": [0, 1], **out}
    text = write_replicate_report(tmp_path / "report.md", "rep", summary).read_text()
    assert "| stored | pass (0.950) | pass (0.950) |" in text
    assert "| KnowTuning | completeness | +0.2000 [" in text and "+0.1000 [+0.0900, +0.1100]" in text
    kinds = out["by_kind"]["knowtuning"]
    assert kinds["overview"]["questions"] == 20 and kinds["narrow"]["questions"] == 60
    overview = [r["completeness"] for seed in (0, 1) for r in json.loads(
        (tmp_path / f"seed{seed}" / "eval" / "world_metrics.json").read_text())["rows"]["knowtuning"][::4]]
    assert kinds["overview"]["completeness"] == pytest.approx(np.mean(overview))
    assert "## By question kind (pooled over seeds)" in text and "| KnowTuning | narrow | 60 |" in text


def test_search_candidates_apply_to_their_own_section() -> None:
    cfg = load_config(PipelineConfig, CI, [
        "world.valid_fraction=0.2",
        "search.candidates=[{sft.optim.learning_rate: 0.001, dpo.dpo.beta: 0.5}, {sft.train.num_epochs: 2}]"])
    sft = cfg.search.section_configs("sft", cfg.sft)
    assert [c.optim.learning_rate for c in sft] == [0.001, cfg.sft.optim.learning_rate]
    assert [c.train.num_epochs for c in sft] == [cfg.sft.train.num_epochs, 2]
    assert [c.dpo.beta for c in cfg.search.section_configs("dpo", cfg.dpo)] == [0.5, cfg.dpo.dpo.beta]
    with pytest.raises(ConfigError, match="validation entities"):
        load_config(PipelineConfig, CI, ["search.candidates=[{sft.optim.learning_rate: 0.001}]"])
    with pytest.raises(ConfigError, match=r"search\.candidates\[0\]: unknown key\(s\) optim\.lr"):
        load_config(PipelineConfig, CI, ["world.valid_fraction=0.2", "search.candidates=[{sft.optim.lr: 0.1}]"])
    with pytest.raises(ConfigError, match=r"dotted key under sft\. or dpo\."):
        SearchConfig(candidates=({"eval.bertscore": True},)).validate()


def test_a_stage_rerun_under_a_new_key_never_resumes_old_scratch(tmp_path) -> None:
    from kt_jax.workflow.resume import Stages

    out = tmp_path / "train" / "sft@0"
    seen = []

    def train(fail: bool = False):
        def fn():
            seen.append((out / "checkpoints" / "latest").read_text() if (out / "checkpoints").exists() else None)
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            (out / "checkpoints" / "latest").write_text(str(len(seen)))
            if fail:
                raise KeyboardInterrupt  # killed mid-stage
            (out / "export").mkdir(exist_ok=True)
            (out / "export" / "config.json").write_text("{}")
            return {}
        return fn

    def run(lr: float, fail: bool = False) -> None:
        stages = Stages(tmp_path)
        stages.run("sft@0", train(fail), settings={"lr": lr}, outputs=[out / "export" / "config.json"],
                   scratch=[out])

    with pytest.raises(KeyboardInterrupt):
        run(1e-3, fail=True)
    run(1e-3)  # killed and restarted under the same key: resumes from its checkpoint
    assert seen == [None, "1"]
    run(1e-3)  # finished: skipped
    assert len(seen) == 2
    run(3e-4)  # new settings, same directory: the old checkpoints are deleted, not resumed
    assert seen == [None, "1", None]


def test_the_report_reads_only_this_invocations_searches(tmp_path) -> None:
    (tmp_path / "search").mkdir()
    for name in ("ka", "sft"):
        (tmp_path / "search" / f"{name}.json").write_text(json.dumps({"system": name, "chosen": 0, "candidates": []}))
    assert [t["system"] for t in search_table(tmp_path, {"sft": "sft@1"})] == ["sft"]
    assert search_table(tmp_path, {}) == []  # a rerun without candidates shows no stale search table
