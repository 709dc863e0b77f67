"""Several seeds of one world config (`seeds: [0, 1, 2]`): each seed a whole run, then one report over them.

Seed s sets the world, pretraining, knowledge (KC randomness) and both training stages' seeds to s and runs in
`<run_dir>/seed<s>/` (each a normal, resumable run). The replicate report holds the validity checks per seed, every
metric as mean ± sample std over seeds with the per-seed values, each system's difference from SFT per seed (paired
bootstrap CI), and a pooled difference: the paired bootstrap over the test questions of every seed together.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kt_jax.errors import ConfigError

PipelineConfig = Any  # workflow.config.PipelineConfig
METRICS = ("completeness", "factuality", "logicality", "recall_micro", "wrong_per_answer")


def seed_config(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    """The one-seed run of `cfg` for `seed` (run directory `<run_dir>/seed<seed>`)."""
    if cfg.world is None or cfg.pretrain is None:
        raise ConfigError("seeds: a multi-seed run needs a world and its pretrain section")
    tune = lambda t: dataclasses.replace(t, train=dataclasses.replace(t.train, seed=seed))
    root = Path(cfg.run_dir or f"runs/{cfg.name}")
    return dataclasses.replace(
        cfg, seeds=(), name=f"{cfg.name}-seed{seed}", run_dir=str(root / f"seed{seed}"),
        world=dataclasses.replace(cfg.world, seed=seed), pretrain=dataclasses.replace(cfg.pretrain, seed=seed),
        knowledge=dataclasses.replace(cfg.knowledge, seed=seed), sft=tune(cfg.sft), dpo=tune(cfg.dpo))


def run_seeds(cfg: PipelineConfig, mesh: Any = None) -> dict[str, Any]:
    """Run every seed (resuming finished ones), then write `<run_dir>/summary.json` and `report.md` over them."""
    import time

    from kt_jax.config import save_config
    from kt_jax.distributed import is_main_process
    from kt_jax.workflow.stages import Pipeline

    start = time.perf_counter()
    root = Path(cfg.run_dir or f"runs/{cfg.name}")
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    per_seed = {}
    for seed in cfg.seeds:
        pipe = Pipeline(seed_config(cfg, seed), mesh=mesh)
        per_seed[seed] = pipe.run()
        mesh = pipe.mesh
    summary = {"run_dir": str(root), "report": str(root / "report.md"), "seeds": list(cfg.seeds),
               "seconds": time.perf_counter() - start, "machine": per_seed[cfg.seeds[0]].get("machine"),
               **combine(root, per_seed)}
    if is_main_process():
        write_replicate_report(root / "report.md", cfg.name, summary)
        (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def combine(root: Path, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Validity per seed, metrics and differences aggregated over seeds, and pooled paired differences."""
    from kt_jax.eval.statistics import aggregate_seeds
    from kt_jax.workflow.world_checks import by_kind, differences

    numbers = {s: {name: {m: v for m, v in values.items() if m in METRICS and isinstance(v, int | float)}
                   for name, values in summary["metrics"].items()} for s, summary in per_seed.items()}
    first = next(iter(numbers.values()))
    common = {name: [m for m in first[name] if all(m in numbers[s].get(name, {}) for s in numbers)]
              for name in first if all(name in v for v in numbers.values())}  # drops a metric one seed lacks
    metrics = {s: {name: {m: v[name][m] for m in keys} for name, keys in common.items()} for s, v in numbers.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    for seed in per_seed:
        world = json.loads((root / f"seed{seed}" / "eval" / "world_metrics.json").read_text())
        for name, r in world["rows"].items():
            if name != "base":
                rows.setdefault(name, []).extend(r)
    return {"validity": {s: summary["validity"] for s, summary in per_seed.items()},
            "metrics": aggregate_seeds(metrics),
            "differences": aggregate_seeds({s: summary["differences"] for s, summary in per_seed.items()}),
            "pooled_differences": differences(rows), "questions": {s: s_sum.get("questions") for s, s_sum in
                                                                    per_seed.items()},
            # rows written before question kinds were recorded have none
            "by_kind": by_kind(rows) if all("kind" in r for r in rows.get("sft", [{}])) else None}


def _pm(agg: dict[str, Any]) -> str:
    std = agg.get("std")
    return f"{agg['mean']:.4f} ± {std:.4f}" if std is not None else f"{agg['mean']:.4f}"


def write_replicate_report(path: Path, name: str, summary: dict[str, Any]) -> Path:
    """report.md of a multi-seed run."""
    from kt_jax.workflow.config import SYSTEM_LABELS
    from kt_jax.workflow.report import _by_kind, timing_line

    seeds = summary["seeds"]
    lines = [f"# KnowTuning replicate: {name} (seeds {', '.join(map(str, seeds))})", "",
             "Each seed is a whole run (world, base model, knowledge, training): `seed<s>/report.md`.", "",
             *([timing_line({**summary["machine"], "seconds": summary["seconds"]}), ""] if summary.get("machine")
               else []),
             "## Validity of the instrument, per seed", "",
             "| check | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    checks = list(dict.fromkeys(c for v in summary["validity"].values() for c in v))
    for check in checks:
        cells = []
        for s in seeds:
            c = summary["validity"][s].get(check)
            cells.append("-" if c is None else f"{'pass' if c['pass'] else 'FAIL'} ({_num(c['value'])})")
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    lines += ["", "## Metrics (mean ± std over seeds; per seed in summary.json)", ""]
    metrics = summary["metrics"]
    keys = [m for m in METRICS if any(m in v for v in metrics.values())]
    lines += ["| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for system, values in metrics.items():
        lines.append(f"| {SYSTEM_LABELS.get(system, system)} | "
                     + " | ".join(_pm(values[k]) if k in values else "" for k in keys) + " |")
    lines += ["", "## Differences from SFT", "",
              "Pooled: paired bootstrap over the test questions of all seeds (95% CI). Per seed: each seed's own "
              "paired bootstrap CI.", "", "| system | metric | pooled | " + " | ".join(f"seed {s}" for s in seeds)
              + " |", "|---|---|---|" + "---|" * len(seeds)]
    for system, diff in summary["pooled_differences"].items():
        for metric, d in diff.items():
            per = summary["differences"].get(system, {}).get(metric)
            cells = [f"{per['mean']['per_seed'][s]:+.4f} [{per['ci_low']['per_seed'][s]:+.4f}, "
                     f"{per['ci_high']['per_seed'][s]:+.4f}]" if per else "-" for s in seeds]
            lines.append(f"| {SYSTEM_LABELS.get(system, system)} | {metric} | {d['mean']:+.4f} "
                         f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | " + " | ".join(cells) + " |")
    if summary.get("by_kind"):
        lines += ["", *_by_kind(summary["by_kind"], SYSTEM_LABELS, "pooled over seeds")]
    path.write_text("\n".join(lines) + "\n")
    return path


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
