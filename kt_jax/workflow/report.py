"""report.md of a `kt-jax run`: every system's exact world metrics (if any) and text metrics, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = ("completeness", "factuality", "logicality", "recall_micro", "hallucinated_per_answer", "meteor",
           "rouge_l", "bertscore_f1")


def write_report(path: Path, name: str, run_dir: Path, metrics: dict[str, dict[str, float]],
                 probe: dict[str, Any] | None, labels: dict[str, str]) -> Path:
    """Write the run's report.md to `path`; returns it."""
    keys = [k for k in COLUMNS if any(k in m for m in metrics.values())]
    lines = [f"# KnowTuning run: {name}", "", f"Run directory: `{run_dir}`; detailed evaluation: `eval/report.md`.", ""]
    if probe and "probe" in probe:
        p = probe["probe"]
        lines += [f"Base model ({probe.get('num_params', 0) / 1e6:.2f}M params) recall on the test entities "
                  f"before fine-tuning: completeness {p['completeness']:.3f}, factuality {p['factuality']:.3f}.", ""]
    lines += ["| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for system, m in metrics.items():
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "" for k in keys]
        lines.append(f"| {labels.get(system, system)} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path
