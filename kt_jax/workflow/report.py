"""report.md of a `kt-jax run`: validity checks first (world runs), then every system's metrics side by side, then
each system's difference from SFT with its paired-bootstrap 95% CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = ("completeness", "factuality", "logicality", "recall_micro", "hallucinated_per_answer", "meteor",
           "rouge_l", "bertscore_f1")


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "pass", False: "FAIL", None: "not measured"}[value]
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _validity(validity: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Validity of the instrument", "", "| check | value | threshold | result | detail |",
             "|---|---|---|---|---|"]
    for name, check in validity.items():
        detail = "; ".join(f"{k}: {_cell(v)}" for k, v in check.items() if k not in ("value", "threshold", "pass"))
        lines.append(f"| {name} | {_cell(check['value'])} | {_cell(check['threshold'])} | {_cell(check['pass'])} | "
                     f"{detail} |")
    return [*lines, ""]


def _differences(differences: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    metrics = list(dict.fromkeys(m for d in differences.values() for m in d))
    lines = ["## Differences from SFT (paired bootstrap over test questions, 95% CI)", "",
             "| system | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for system, diff in differences.items():
        cells = [f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if (d := diff.get(m)) else ""
                 for m in metrics]
        lines.append(f"| {labels.get(system, system)} | " + " | ".join(cells) + " |")
    return [*lines, "", "Forest plot: `eval/differences.png`.", ""]


def _by_kind(by_kind: dict[str, dict[str, dict[str, float]]], labels: dict[str, str],
             scope: str = "test questions") -> list[str]:
    lines = [f"## By question kind ({scope})", "",
             "| system | kind | questions | completeness | facts stated per answer | wrong per answer | "
             "off-target per answer |", "|---|---|---|---|---|---|---|"]
    for system, kinds in by_kind.items():
        for kind, m in kinds.items():
            lines.append(f"| {labels.get(system, system)} | {kind} | {m['questions']} | {m['completeness']:.4f} | "
                         f"{m['stated_per_answer']:.2f} | {m['wrong_per_answer']:.2f} | "
                         f"{m['off_target_per_answer']:.2f} |")
    return [*lines, ""]


def _search(searched: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = ["## Hyperparameters chosen on the validation entities", "",
             "Each system trained every candidate; only the chosen one (*) answered the test questions.", "",
             "| system | candidate | overrides | validation completeness | factuality | recall |",
             "|---|---|---|---|---|---|"]
    for s in searched:
        for c in s["candidates"]:
            mark = " *" if c["candidate"] == s["chosen"] else ""
            v = c["validation"]
            lines.append(f"| {labels.get(s['system'], s['system'])} | {c['candidate']}{mark} | "
                         f"{', '.join(f'{k}={x}' for k, x in c['overrides'].items()) or '(section unchanged)'} | "
                         f"{v.get('completeness', 0):.4f} | {v.get('factuality', 0):.4f} | "
                         f"{v.get('recall_micro', 0):.4f} |")
    return [*lines, ""]


def timing_line(timing: dict[str, Any]) -> str:
    """How long the run took (stages skipped as up to date take no time) and the machine's measured matmul rate."""
    return (f"This invocation took {timing['seconds']:.0f} s on {timing['backend']}, whose jax float32 2048^3 matmul "
            f"measured {timing['matmul_gflops']:.0f} GFLOP/s at the start (scale by that rate to compare machines)."
            + (f" Host malloc: {timing['host_malloc']}." if timing.get("host_malloc") else ""))


def write_report(path: Path, name: str, run_dir: Path, metrics: dict[str, dict[str, float]],
                 probe: dict[str, Any] | None, labels: dict[str, str], *,
                 validity: dict[str, dict[str, Any]] | None = None,
                 differences: dict[str, dict[str, Any]] | None = None,
                 search: list[dict[str, Any]] | None = None, timing: dict[str, Any] | None = None,
                 by_kind: dict[str, dict[str, dict[str, float]]] | None = None) -> Path:
    """Write the run's report.md to `path`; returns it."""
    keys = [k for k in COLUMNS if any(k in m for m in metrics.values())]
    lines = [f"# KnowTuning run: {name}", "", f"Run directory: `{run_dir}`; detailed evaluation: `eval/report.md`.", ""]
    if timing:
        lines += [timing_line(timing), ""]
    if validity:
        lines += _validity(validity)
    if probe and "probe" in probe:
        p = probe["probe"]
        lines += [f"Base model ({probe.get('num_params', 0) / 1e6:.2f}M params) recall on the test entities "
                  f"before fine-tuning: completeness {p['completeness']:.3f}, factuality {p['factuality']:.3f}.", ""]
    lines += ["| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for system, m in metrics.items():
        cells = [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "" for k in keys]
        lines.append(f"| {labels.get(system, system)} | " + " | ".join(cells) + " |")
    lines.append("")
    if differences:
        lines += _differences(differences, labels)
    if by_kind:
        lines += _by_kind(by_kind, labels)
    if search:
        lines += _search(search, labels)
    path.write_text("\n".join(lines) + "\n")
    return path
