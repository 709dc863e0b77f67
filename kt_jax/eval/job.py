"""Evaluate systems' predictions files: METEOR / ROUGE-L / BERTScore, LLM-judged win/tie/lose, fact checks, report.

Outputs in `out`: `metrics.json` and `metrics_<system>.jsonl` (per answer), with a judge or fact checks `judge.json`,
`judge_<system>_vs_<baseline>.jsonl` and `facts_<system>.jsonl`, then `report.md` + `plots/` and `eval_config.json`
(the config with the backend option names only, never their values, so no secret reaches it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from kt_jax.config import to_dict
from kt_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation of several systems' predictions (`kt-jax eval`)."""

    predictions: dict[str, str] = dataclasses.field(default_factory=dict)  # system -> predictions.jsonl, in order
    out: str = ""                        # directory for report.md, plots/ and the JSON(L) outputs
    baseline: str | None = None          # system the others are judged against (None: the first)
    limit: int | None = None             # only the first N questions
    bertscore: bool = True               # BERTScore F1 beside METEOR and ROUGE-L
    bertscore_model: str | None = None   # local HF encoder dir, e.g. roberta-large (None: the packaged MiniLM)
    bertscore_layers: int | None = None  # embedding layer (None: bert-score's for a known encoder, 17 for
                                         # roberta-large; else the last). The report names the model and layer.
    bertscore_idf: bool = False          # idf-weight tokens (idf from the references)
    judge: bool = False                  # pairwise LLM judge of each system vs the baseline
    facts: bool = False                  # extract and verify the facts of every answer
    backend: str = "offline"             # knowledge backend for the judge and fact checks: offline | anthropic
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # model, base_url, cache...
    reconcile: str = "strict"            # how the two answer orders combine (strict: a win must hold in both)
    workers: int = 4                     # concurrent backend calls
    facts_method: str = "factscore"      # factscore: supported | contradicted | not verifiable (reference + judge
    #                                      knowledge) | reference: supported by the reference answer or not

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        if self.baseline is not None and self.predictions and self.baseline not in self.predictions:
            raise ConfigError(f"--baseline {self.baseline!r} is not one of the systems {sorted(self.predictions)}")
        if self.facts_method not in ("factscore", "reference"):
            raise ConfigError(f"facts_method: {self.facts_method!r} is not one of factscore, reference")
        if self.reconcile not in ("strict", "sum"):
            raise ConfigError(f"reconcile: {self.reconcile!r} is not one of strict, sum")


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions.jsonl, checked for the fields eval needs."""
    rows = []
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file does not exist")
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("id", "question", "reference", "prediction") if k not in row]
        if missing:
            raise DataError(f"{path}: line {n + 1}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _text_metrics(cfg: EvalConfig, systems: dict[str, list[dict[str, Any]]], out: Path) -> tuple[dict, Any]:
    """Mean METEOR / ROUGE-L (/ BERTScore F1) per system, with per-answer files; (metrics, BERTScorer or None)."""
    import numpy as np

    from kt_jax.eval.metrics import BERTScorer, meteor, rouge_l

    metrics: dict[str, dict[str, float]] = {}
    scorer = BERTScorer(cfg.bertscore_model, cfg.bertscore_layers, idf=cfg.bertscore_idf) if cfg.bertscore else None
    for name, rows in systems.items():
        preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        per = {"meteor": meteor(preds, refs), "rouge_l": rouge_l(preds, refs)}
        if scorer is not None:
            per["bertscore_f1"] = scorer.score(preds, refs)["f1"]
        metrics[name] = {k: float(np.mean(v)) if v else 0.0 for k, v in per.items()}
        _write_jsonl(out / f"metrics_{name}.jsonl", [{"id": r["id"], **{k: v[i] for k, v in per.items()}}
                                                    for i, r in enumerate(rows)])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics, scorer


def _judged(cfg: EvalConfig, systems: dict[str, list[dict[str, Any]]], baseline: str, out: Path,
            progress: bool) -> tuple[dict, dict, dict]:
    """(win/tie/lose, order agreement, fact summaries) from the LLM backend, with per-answer files and judge.json."""
    from tqdm import tqdm

    from kt_jax.eval.facts import evaluate_facts, fact_summary
    from kt_jax.eval.judge import judge_pairs, pair_items, position_consistency, win_tie_lose
    from kt_jax.knowledge.registry import make_backend

    def bar(total: int, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="q", disable=not progress)

    judge, consistency, facts = {}, {}, {}
    backend = make_backend(cfg.backend, **cfg.backend_options)
    if cfg.judge:
        for name, rows in systems.items():
            if name == baseline:
                continue
            items = pair_items(rows, systems[baseline])
            with bar(len(items), f"judge {name} vs {baseline}") as b:
                results = judge_pairs(backend, items, rule=cfg.reconcile, workers=cfg.workers, progress=b.update)
            key = f"{name} vs {baseline}"
            judge[key], consistency[key] = win_tie_lose(results), position_consistency(results)
            _write_jsonl(out / f"judge_{name}_vs_{baseline}.jsonl",
                         [{"id": r["id"], **res} for r, res in zip(rows, results, strict=True)])
    if cfg.facts:
        for name, rows in systems.items():
            with bar(len(rows), f"facts {name}") as b:
                results = evaluate_facts(backend, [(r["question"], r["prediction"], r["reference"]) for r in rows],
                                         workers=cfg.workers, progress=b.update, method=cfg.facts_method)
            facts[name] = fact_summary(results)
            _write_jsonl(out / f"facts_{name}.jsonl", [{"id": r["id"], **res}
                                                       for r, res in zip(rows, results, strict=True)])
    (out / "judge.json").write_text(json.dumps({"win_tie_lose": judge, "orders_agree_pct": consistency,
                                                "facts": facts}, indent=2) + "\n")
    return judge, consistency, facts


def evaluate_files(cfg: EvalConfig, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate every system's predictions into `cfg.out`; returns metrics, judge tables, fact summaries, report."""
    from kt_jax.eval.report import write_report

    cfg.validate()
    if not cfg.predictions or not cfg.out:
        raise ConfigError("predictions and out are required: at least one system (name -> predictions.jsonl) and "
                          "the output directory")
    systems = {name: load_predictions(path) for name, path in cfg.predictions.items()}
    if cfg.limit:
        systems = {k: v[: cfg.limit] for k, v in systems.items()}
    baseline = cfg.baseline or next(iter(systems))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = {**to_dict(cfg), "backend_options": sorted(cfg.backend_options)}  # names only: no secrets
    (out / "eval_config.json").write_text(json.dumps(recorded, indent=2) + "\n")
    start = time.perf_counter()
    metrics, scorer = _text_metrics(cfg, systems, out)
    judge: dict = {}
    consistency: dict = {}
    facts: dict = {}
    if cfg.judge or cfg.facts:
        judge, consistency, facts = _judged(cfg, systems, baseline, out, progress)
    meta = {"systems": ", ".join(f"{k} ({len(v)} answers)" for k, v in systems.items()), "baseline": baseline,
            "judge backend": cfg.backend if (cfg.judge or cfg.facts) else "not used",
            "BERTScore": "skipped" if scorer is None else f"{scorer.label} ({scorer.model_path}; no rescaling)"}
    labels = {} if scorer is None else {"bertscore_f1": f"BERTScore F1 ({scorer.label})"}
    report = write_report(out, metrics=metrics, judge=judge, consistency=consistency, facts=facts, meta=meta,
                          metric_labels=labels)
    return {"metrics": metrics, "judge": judge, "orders_agree_pct": consistency, "facts": facts,
            "baseline": baseline, "bertscore": None if scorer is None else scorer.describe(), "report": str(report),
            "seconds": time.perf_counter() - start}
