"""`kt-jax eval`: METEOR / ROUGE-L / BERTScore per system, LLM-judged win/tie/lose and fact checks, report.md.

The work is `kt_jax.eval.job.evaluate_files`; this module turns the command line into its EvalConfig.
"""

from __future__ import annotations

import argparse

from kt_jax.errors import ConfigError
from kt_jax.eval.job import EvalConfig, evaluate_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (one per EvalConfig key)."""
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
    """NAME=VALUE strings as a dict, in order."""
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"{what} {spec!r}: expected NAME=VALUE")
        key, value = spec.split("=", 1)
        out[key.strip()] = value
    return out


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig the command line names."""
    return EvalConfig(predictions=_pairs(args.predictions, "--predictions"), out=args.out, baseline=args.baseline,
                      limit=args.limit, bertscore=not args.no_bertscore, bertscore_model=args.bertscore_model,
                      bertscore_layers=args.bertscore_layers, bertscore_idf=args.bertscore_idf, judge=args.judge,
                      facts=args.facts, backend=args.backend,
                      backend_options=_pairs(args.backend_option, "--backend-option"), reconcile=args.reconcile,
                      workers=args.workers)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics and judge tables."""
    s = evaluate_files(config_from_args(args))
    print(f"wrote {s['report']} in {s['seconds']:.1f} s")
    for name, m in s["metrics"].items():
        print(f"  {name:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    for key, table in s["judge"].items():
        print(f"  {key}: " + "  ".join(f"{a} {t['win']}/{t['tie']}/{t['lose']}" for a, t in table.items()))
    return 0
