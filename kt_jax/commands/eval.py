"""`kt-jax eval`: METEOR / ROUGE-L / BERTScore per system, LLM-judged win/tie/lose and fact checks, report.md."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", action="append", required=True, metavar="NAME=PATH",
                        help="a system's predictions.jsonl (from kt-jax generate); repeat for each system")
    parser.add_argument("--baseline", default=None, help="system the others are judged against (default: first)")
    parser.add_argument("--out", required=True, help="directory for report.md, plots/ and the JSON(L) outputs")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--no-bertscore", action="store_true", help="skip BERTScore")
    parser.add_argument("--bertscore-model", default=None, help="local HF encoder dir (default: packaged MiniLM)")
    parser.add_argument("--bertscore-layers", type=int, default=None, help="embedding layer (default: last)")
    parser.add_argument("--bertscore-idf", action="store_true", help="idf-weight tokens (idf from the references)")
    parser.add_argument("--judge", action="store_true", help="pairwise LLM judge of each system vs the baseline")
    parser.add_argument("--facts", action="store_true", help="extract and verify the facts of every answer")
    parser.add_argument("--backend", default="offline", help="knowledge backend: offline | anthropic")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option passed to the backend (e.g. model=..., base_url=...); repeatable")
    parser.add_argument("--reconcile", default="strict", choices=["strict", "sum"],
                        help="how the two answer orders combine (strict: a win must hold in both)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent backend calls")


def _pairs(specs: list[str], what: str) -> dict[str, str]:
    from kt_jax.errors import ConfigError

    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"{what} {spec!r}: expected NAME=VALUE")
        key, value = spec.split("=", 1)
        out[key.strip()] = value
    return out


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions.jsonl, checked for the fields eval needs."""
    from kt_jax.errors import DataError

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


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from kt_jax.errors import ConfigError
    from kt_jax.eval.facts import evaluate_facts, fact_summary
    from kt_jax.eval.judge import judge_pairs, pair_items, position_consistency, win_tie_lose
    from kt_jax.eval.metrics import BERTScorer, meteor, rouge_l
    from kt_jax.eval.report import write_report

    systems = {name: load_predictions(path) for name, path in _pairs(args.predictions, "--predictions").items()}
    if args.limit:
        systems = {k: v[: args.limit] for k, v in systems.items()}
    baseline = args.baseline or next(iter(systems))
    if baseline not in systems:
        raise ConfigError(f"--baseline {baseline!r} is not one of the systems {sorted(systems)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "backend_option"}
    config["backend_options"] = sorted(_pairs(args.backend_option, "--backend-option"))  # names only: no secrets
    (out / "eval_config.json").write_text(json.dumps(config, indent=2) + "\n")
    start = time.perf_counter()

    metrics: dict[str, dict[str, float]] = {}
    scorer = None if args.no_bertscore else BERTScorer(args.bertscore_model, args.bertscore_layers,
                                                       idf=args.bertscore_idf)
    for name, rows in systems.items():
        preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        per = {"meteor": meteor(preds, refs), "rouge_l": rouge_l(preds, refs)}
        if scorer is not None:
            per["bertscore_f1"] = scorer.score(preds, refs)["f1"]
        metrics[name] = {k: float(np.mean(v)) if v else 0.0 for k, v in per.items()}
        _write_jsonl(out / f"metrics_{name}.jsonl", [{"id": r["id"], **{k: v[i] for k, v in per.items()}}
                                                    for i, r in enumerate(rows)])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    judge, consistency, facts = {}, {}, {}
    if args.judge or args.facts:
        from kt_jax.knowledge import make_backend

        backend = make_backend(args.backend, **_pairs(args.backend_option, "--backend-option"))
        if args.judge:
            for name, rows in systems.items():
                if name == baseline:
                    continue
                items = pair_items(rows, systems[baseline])
                with _bar(len(items), f"judge {name} vs {baseline}") as bar:
                    results = judge_pairs(backend, items, rule=args.reconcile, workers=args.workers,
                                          progress=bar.update)
                key = f"{name} vs {baseline}"
                judge[key], consistency[key] = win_tie_lose(results), position_consistency(results)
                _write_jsonl(out / f"judge_{name}_vs_{baseline}.jsonl",
                             [{"id": r["id"], **res} for r, res in zip(rows, results, strict=True)])
        if args.facts:
            for name, rows in systems.items():
                with _bar(len(rows), f"facts {name}") as bar:
                    results = evaluate_facts(backend, [(r["question"], r["prediction"], r["reference"])
                                                       for r in rows], workers=args.workers, progress=bar.update)
                facts[name] = fact_summary(results)
                _write_jsonl(out / f"facts_{name}.jsonl", [{"id": r["id"], **res}
                                                           for r, res in zip(rows, results, strict=True)])
        (out / "judge.json").write_text(json.dumps({"win_tie_lose": judge, "orders_agree_pct": consistency,
                                                    "facts": facts}, indent=2) + "\n")

    meta = {"systems": ", ".join(f"{k} ({len(v)} answers)" for k, v in systems.items()), "baseline": baseline,
            "judge backend": args.backend if (args.judge or args.facts) else "not used",
            "BERTScore model": "skipped" if scorer is None else f"{scorer.model_path} (layer {scorer.num_layers})"}
    report = write_report(out, metrics=metrics, judge=judge, consistency=consistency, facts=facts, meta=meta)
    print(f"wrote {report} in {time.perf_counter() - start:.1f} s")
    for name, m in metrics.items():
        print(f"  {name:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    for key, table in judge.items():
        print(f"  {key}: " + "  ".join(f"{a} {t['win']}/{t['tie']}/{t['lose']}" for a, t in table.items()))
    return 0
