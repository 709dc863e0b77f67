"""Paired comparisons of systems over the same test questions, aggregation over seeds, and a forest plot.

- `paired_bootstrap(system, baseline)`: the mean of (system - baseline) over questions with a percentile bootstrap
  CI (questions resampled with replacement, the same draw for both systems, so the pairing is kept). A NaN is a
  value undefined for that question (e.g. logicality with fewer than two facts stated): it is left out of that
  system's mean in every resample, as the summary's mean leaves it out.
- `paired_bootstrap_ratio`: the same for a ratio of sums (micro averages such as correct / stated facts).
- `world_differences(system_rows, baseline_rows)`: both, for the world checker's per-question rows
  (`kt_jax.world.checker.per_question`), on the metrics the summary reports; each point estimate is exactly the
  difference of the two summaries' numbers.
- `aggregate_seeds`: mean, sample standard deviation and per-seed values of each number over seeds (nested dicts
  keep their nesting).
- `forest_plot`: one panel per metric, one row per system: the difference and its CI, a line at zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kt_jax.errors import DataError

Interval = dict[str, float]  # {"mean", "ci_low", "ci_high"}
# metric -> (how it is estimated, the per-question field(s), the summary key it reproduces)
WORLD_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "completeness": ("mean", ("completeness",), "completeness"),
    "factuality": ("ratio", ("correct", "stated"), "factuality"),
    "logicality": ("mean", ("logicality",), "logicality"),
    "recall": ("ratio", ("recalled", "gold"), "recall_micro"),
    "wrong_per_answer": ("mean", ("wrong",), "wrong_per_answer"),
}


def _paired(*arrays: Any) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = out[0].shape
    if len(n) != 1 or n[0] == 0 or any(a.shape != n for a in out):
        shapes = [a.shape for a in out]
        raise DataError(f"paired bootstrap: need equal-length non-empty 1-D arrays, got shapes {shapes}")
    return out


def _interval(point: float, stats: np.ndarray, level: float) -> Interval:
    if not 0.0 < level < 1.0:
        raise DataError(f"paired bootstrap: level must be in (0, 1), got {level}")
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return {"mean": float(point), "ci_low": float("nan"), "ci_high": float("nan")}
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(point), "ci_low": float(lo), "ci_high": float(hi)}


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise DataError(f"paired bootstrap: resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _masked_mean(x: np.ndarray, idx: np.ndarray | None) -> np.ndarray | float:
    ok = ~np.isnan(x)
    vals = np.where(ok, x, 0.0)
    if idx is None:
        return float(vals.sum() / ok.sum()) if ok.any() else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        return vals[idx].sum(axis=1) / ok[idx].sum(axis=1)


def _cluster_weights(clusters: Sequence[Any], resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] weights: how often each item's cluster was drawn when whole clusters are resampled."""
    _, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    groups = int(inverse.max()) + 1
    draws = _draws(groups, resamples, seed) + groups * np.arange(resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=resamples * groups).reshape(resamples, groups)
    return counts[:, inverse].astype(np.float64)


def _weighted_mean(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights * np.where(ok, x, 0.0)).sum(axis=1) / (weights * ok).sum(axis=1)


def paired_bootstrap(system: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray, *,
                     resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                     clusters: Sequence[Any] | None = None) -> Interval:
    """Mean of (system - baseline) over paired questions and its percentile bootstrap CI (NaN = undefined).

    With `clusters` (one label per question, e.g. the entity asked about) whole clusters are resampled, which keeps
    the correlation of questions about one entity in the interval.
    """
    sys_, base = _paired(system, baseline)
    if clusters is not None:
        if len(clusters) != sys_.size:
            raise DataError(f"paired bootstrap: {len(clusters)} cluster labels for {sys_.size} questions")
        weights = _cluster_weights(clusters, resamples, seed)
        point = _masked_mean(sys_, None) - _masked_mean(base, None)
        return _interval(point, _weighted_mean(sys_, weights) - _weighted_mean(base, weights), level)
    idx = _draws(sys_.size, resamples, seed)
    if not (np.isnan(sys_).any() or np.isnan(base).any()):
        diff = sys_ - base
        return _interval(float(diff.mean()), diff[idx].mean(axis=1), level)
    point = _masked_mean(sys_, None) - _masked_mean(base, None)
    return _interval(point, _masked_mean(sys_, idx) - _masked_mean(base, idx), level)


def paired_bootstrap_ratio(system_num: Sequence[float] | np.ndarray, system_den: Sequence[float] | np.ndarray,
                           baseline_num: Sequence[float] | np.ndarray, baseline_den: Sequence[float] | np.ndarray, *,
                           resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> Interval:
    """sum(num)/sum(den) of the system minus the baseline's, with a paired percentile bootstrap CI."""
    sn, sd, bn, bd = _paired(system_num, system_den, baseline_num, baseline_den)
    idx = _draws(sn.size, resamples, seed)

    def ratio(num: np.ndarray, den: np.ndarray, axis: int | None) -> Any:
        with np.errstate(invalid="ignore", divide="ignore"):
            return num.sum(axis=axis) / den.sum(axis=axis)

    point = ratio(sn, sd, None) - ratio(bn, bd, None)
    return _interval(float(point), ratio(sn[idx], sd[idx], 1) - ratio(bn[idx], bd[idx], 1), level)


def _column(rows: Sequence[Mapping[str, Any]], field: str) -> np.ndarray:
    return np.array([np.nan if r[field] is None else float(r[field]) for r in rows], dtype=np.float64)


def world_differences(system_rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]], *,
                      metrics: Sequence[str] = tuple(WORLD_METRICS), resamples: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Interval]:
    """{metric: {"mean", "ci_low", "ci_high"}} of system minus baseline from `checker.per_question` rows."""
    if len(system_rows) != len(baseline_rows):
        raise DataError(f"world_differences: {len(system_rows)} system answers but {len(baseline_rows)} baseline")
    for i, (a, b) in enumerate(zip(system_rows, baseline_rows, strict=True)):
        if a.get("entity_id") != b.get("entity_id"):
            raise DataError(f"world_differences: row {i}: entity {a.get('entity_id')!r} vs {b.get('entity_id')!r}; "
                            "the two systems must answer the same questions in the same order")
    out = {}
    for name in metrics:
        if name not in WORLD_METRICS:
            raise DataError(f"world_differences: unknown metric {name!r}; choose from {sorted(WORLD_METRICS)}")
        how, fields, _ = WORLD_METRICS[name]
        opts = {"resamples": resamples, "seed": seed, "level": level}
        if how == "mean":
            out[name] = paired_bootstrap(_column(system_rows, fields[0]), _column(baseline_rows, fields[0]), **opts)
        else:
            out[name] = paired_bootstrap_ratio(*(_column(rows, f) for rows in (system_rows, baseline_rows)
                                                 for f in fields), **opts)
    return out


def aggregate_seeds(per_seed: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    """Each number over seeds as {"mean", "std" (sample; None for one seed), "per_seed": {seed: value}}.

    The seeds' dicts may nest (e.g. {system: {metric: {"mean", "ci_low", "ci_high"}}}): the result keeps the
    nesting and replaces every number by its aggregate; every seed must have the same keys.
    """
    if not per_seed:
        raise DataError("aggregate_seeds: no seeds")
    return _aggregate(per_seed, "")


def _aggregate(per_seed: Mapping[Any, Any], where: str) -> Any:
    first = next(iter(per_seed.values()))
    if isinstance(first, Mapping):
        out = {}
        for key in first:
            missing = [s for s, vals in per_seed.items() if not isinstance(vals, Mapping) or key not in vals]
            if missing:
                raise DataError(f"aggregate_seeds: {where + str(key)!r} missing for seed(s) {missing}")
            out[key] = _aggregate({s: vals[key] for s, vals in per_seed.items()}, f"{where}{key}/")
        return out
    try:
        vals = np.array([float(v) for v in per_seed.values()], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"aggregate_seeds: {where.rstrip('/')!r} is not a number in every seed") from None
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if vals.size > 1 else None,
            "per_seed": {s: float(v) for s, v in per_seed.items()}}


def forest_plot(differences: Mapping[str, Mapping[str, Interval]], path: str | Path, *, baseline: str = "SFT",
                title: str = "") -> Path:
    """A PNG with one panel per metric: each system's difference from `baseline` with its CI, a line at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(differences)
    metrics = list(dict.fromkeys(m for s in systems for m in differences[s]))
    if not systems or not metrics:
        raise DataError("forest_plot: no differences to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(systems) + 1.6), sharey=True,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for y, system in enumerate(systems):
            d = differences[system].get(metric)
            if d is None:
                continue
            # a percentile CI may (rarely) not contain the point estimate; NaN = no interval
            err = np.nan_to_num([[max(0.0, d["mean"] - d["ci_low"])], [max(0.0, d["ci_high"] - d["mean"])]])
            ax.errorbar(d["mean"], y, xerr=err, fmt="o", color="tab:blue", capsize=3)
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(f"system - {baseline}", fontsize=8)
        ax.set_ylim(len(systems) - 0.5, -0.5)  # first system on top, half a row of margin
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(systems)), systems)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
