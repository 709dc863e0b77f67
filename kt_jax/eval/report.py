"""report.md with metric, win/tie/lose and fact tables, plus PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kt_jax.eval.judge import ASPECTS

COLORS = {"win": "#2e7d32", "tie": "#9e9e9e", "lose": "#c62828"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def plot_win_tie_lose(table: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Path:
    """Horizontal stacked bars (win / tie / lose %) for each aspect."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.6))
    aspects = [a for a in ASPECTS if a in table]
    for i, aspect in enumerate(aspects):
        left = 0.0
        for outcome in ("win", "tie", "lose"):
            width = float(table[aspect][f"{outcome}_pct"])
            ax.barh(i, width, left=left, color=COLORS[outcome], label=outcome if i == 0 else None)
            if width >= 6:
                ax.text(left + width / 2, i, f"{width:.0f}", ha="center", va="center", color="white", fontsize=9)
            left += width
    ax.set_yticks(range(len(aspects)), aspects)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of questions")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=3, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grouped(values: Mapping[str, Mapping[str, float]], title: str, path: Path, ylabel: str = "") -> Path:
    """Grouped bars: one group per quantity, one bar per system."""
    plt = _plt()
    systems = list(values)
    keys = sorted({k for v in values.values() for k in v})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(keys) * max(1, len(systems)) / 2), 3.2))
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [float(values[system].get(k, 0.0)) for k in keys], width, label=system)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _facts_section(facts: Mapping[str, Mapping[str, float]], out: Path) -> list[str]:
    """The fact tables and plots: FActScore-style labels (summaries with `precision_pct`), reference-only checks."""
    labelled = {s: f for s, f in facts.items() if "precision_pct" in f}
    checked = {s: f for s, f in facts.items() if "precision_pct" not in f}
    md: list[str] = []
    if labelled:
        md += ["", "## Fine-grained facts, FActScore style (each extracted fact labelled supported, contradicted or "
               "not verifiable against the reference answer and the judge's own knowledge)", "",
               "precision = supported / (supported + contradicted); supported / all = supported / every fact "
               "(over all facts, and the mean over answers: FActScore's score).", "",
               _table(["system", "answers", "facts / answer", "supported / answer", "contradicted / answer",
                       "not verifiable / answer", "precision %", "supported / all %", "supported / all % (per answer)"],
                      [[s, int(f["answers"]), float(f["facts_per_answer"]), float(f["supported_per_answer"]),
                        float(f["contradicted_per_answer"]), float(f["not_verifiable_per_answer"]),
                        float(f["precision_pct"]), float(f["supported_pct"]), float(f["supported_pct_macro"])]
                       for s, f in labelled.items()])]
        plot_grouped({s: {"facts": f["facts_per_answer"], "supported": f["supported_per_answer"],
                          "contradicted": f["contradicted_per_answer"]} for s, f in labelled.items()},
                     "Facts per answer", out / "plots" / "facts_labels.png")
        plot_grouped({s: {"precision %": f["precision_pct"], "supported / all %": f["supported_pct"]}
                      for s, f in labelled.items()}, "Fact precision", out / "plots" / "facts_precision.png",
                     ylabel="%")
        md += ["", "![facts](plots/facts_labels.png) ![precision](plots/facts_precision.png)"]
    if checked:
        md += ["", "## Fine-grained facts (extracted from each answer, verified against the reference)", "",
               _table(["system", "answers", "facts / answer", "facts", "% correct", "% correct (per answer)"],
                      [[s, int(f["answers"]), float(f["facts_per_answer"]), int(f["facts_total"]),
                        float(f["correct_pct"]), float(f["correct_pct_macro"])] for s, f in checked.items()])]
        plot_grouped({s: {"facts / answer": f["facts_per_answer"]} for s, f in checked.items()}, "Facts per answer",
                     out / "plots" / "facts_count.png")
        plot_grouped({s: {"% correct": f["correct_pct"]} for s, f in checked.items()}, "% correct facts",
                     out / "plots" / "facts_correct.png", ylabel="%")
        md += ["", "![facts](plots/facts_count.png) ![correct](plots/facts_correct.png)"]
    for s, f in facts.items():
        if f.get("errors"):
            md += ["", f"{s}: {int(f['errors'])} answer(s) left out: a backend call was rejected for good."]
    return md


def write_report(
    out_dir: str | Path,
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    judge: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    consistency: Mapping[str, Mapping[str, float]] | None = None,
    facts: Mapping[str, Mapping[str, float]] | None = None,
    meta: Mapping[str, Any] | None = None,
    metric_labels: Mapping[str, str] | None = None,
) -> Path:
    """Write out_dir/report.md and its PNG plots; returns the report path.

    metrics: system -> {metric: value}; metric_labels: metric -> column header (e.g. the BERTScore model and layer);
    judge: "system vs baseline" -> win_tie_lose table;
    consistency: same keys -> position agreement %; facts: system -> fact_summary (either method).
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    md = ["# kt-jax evaluation report", ""]
    for key, value in (meta or {}).items():
        md.append(f"- **{key}**: {value}")
    if metrics:
        names = sorted({k for v in metrics.values() for k in v})
        md += ["", "## Reference-based metrics", "",
               _table(["system", *[(metric_labels or {}).get(n, n) for n in names]],
                      [[s, *[float(m.get(n, float("nan"))) for n in names]] for s, m in metrics.items()])]
        scaled = {s: {n: 100.0 * float(v) for n, v in m.items()} for s, m in metrics.items()}
        plot_grouped(scaled, "Reference-based metrics (x100)", out / "plots" / "metrics.png")
        md += ["", "![metrics](plots/metrics.png)"]
    if judge:
        md += ["", "## LLM judge: win / tie / lose (each pair judged in both orders)"]
        for comparison, table in judge.items():
            rows = [[a, int(table[a]["win"]), int(table[a]["tie"]), int(table[a]["lose"]),
                     float(table[a]["win_pct"]), float(table[a]["tie_pct"]), float(table[a]["lose_pct"])]
                    for a in ASPECTS if a in table]
            if consistency and comparison in consistency:
                for row in rows:
                    row.append(float(consistency[comparison][row[0]]))
            header = ["aspect", "win", "tie", "lose", "win %", "tie %", "lose %"]
            header += ["orders agree %"] if consistency and comparison in consistency else []
            png = f"plots/judge_{_slug(comparison)}.png"
            plot_win_tie_lose(table, comparison, out / png)
            md += ["", f"### {comparison}", "", _table(header, rows)]
            errors = int(max(table[a].get("errors", 0) for a in ASPECTS if a in table))
            if errors:
                md += ["", f"{errors} question(s) left out: the judge call was rejected for good (see the JSONL)."]
            md += ["", f"![{comparison}]({png})"]
    if facts:
        md += _facts_section(facts, out)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
