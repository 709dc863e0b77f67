"""Pairwise LLM judging of two systems on completeness, factuality and logicality, in both answer orders."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kt_jax.errors import BackendError, ConfigError, DataError

ASPECTS = ("completeness", "factuality", "logicality")
OUTCOMES = ("win", "tie", "lose")
RECONCILE = ("strict", "sum")


@dataclasses.dataclass(frozen=True)
class PairItem:
    """One question answered by the system under test (`answer`) and by the baseline (`baseline`)."""

    question: str
    reference: str
    answer: str
    baseline: str


def _from_view(verdict: str, system_is: str) -> int:
    """+1 when the verdict favours the system shown in slot `system_is`, -1 when the other, 0 for a tie."""
    if verdict == "tie":
        return 0
    return 1 if verdict == system_is else -1


def reconcile(first: str, second: str, rule: str = "strict") -> str:
    """Outcome for the system from verdicts with it as answer A (`first`) and as answer B (`second`).

    strict: a win or a loss must hold in both orders, anything else is a tie (MT-Bench's rule);
    sum: +1/0/-1 per order, the sign of the sum decides.
    """
    if rule not in RECONCILE:
        raise ConfigError(f"judge reconcile rule {rule!r}; choose one of {RECONCILE}")
    for v in (first, second):
        if v not in ("A", "B", "tie"):
            raise BackendError(f"judge verdict {v!r} is not one of 'A', 'B', 'tie'")
    a, b = _from_view(first, "A"), _from_view(second, "B")
    total = (a if a == b else 0) if rule == "strict" else a + b
    return "win" if total > 0 else "lose" if total < 0 else "tie"


def _is_fatal(error: BackendError) -> bool:
    try:
        from kt_jax.knowledge.backend import FatalBackendError
    except ImportError:
        return False
    return isinstance(error, FatalBackendError)


def per_item(fn: Callable[[Any], dict[str, Any]], items: Sequence[Any], workers: int,
             progress: Callable[[int], None] | None) -> list[dict[str, Any]]:
    """`fn` over items on a thread pool; an item whose backend call failed for good gets {"error": reason}."""

    def one(item: Any) -> dict[str, Any]:
        try:
            out = fn(item)
        except BackendError as e:
            if _is_fatal(e):
                raise
            out = {"error": str(e)}
        if progress is not None:
            progress(1)
        return out

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, items))


def judge_pairs(
    backend: Any, items: Sequence[PairItem], *, rule: str = "strict", workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per item {"outcome": {aspect: win|tie|lose}, "ab": verdicts (system as A), "ba": verdicts (system as B)}.

    Items whose judge call was rejected for good get {"error": reason} and are left out of the tables.
    """
    if rule not in RECONCILE:
        raise ConfigError(f"judge reconcile rule {rule!r}; choose one of {RECONCILE}")
    prefetch = getattr(backend, "prefetch", None)
    if prefetch is not None:  # batch APIs answer all uncached calls at once (both orders)
        prefetch("judge", [{"question": i.question, "reference": i.reference, "answer_a": a, "answer_b": b}
                           for i in items for a, b in ((i.answer, i.baseline), (i.baseline, i.answer))])

    def calls(item: PairItem) -> dict[str, Any]:
        ab = backend.judge(item.question, item.reference, item.answer, item.baseline)
        ba = backend.judge(item.question, item.reference, item.baseline, item.answer)
        for name, verdicts in (("ab", ab), ("ba", ba)):
            missing = [a for a in ASPECTS if a not in verdicts]
            if missing:
                raise BackendError(f"judge ({name} order) for question {item.question[:60]!r}: no verdict for "
                                   f"{', '.join(missing)}")
        outcome = {a: reconcile(ab[a], ba[a], rule) for a in ASPECTS}
        return {"outcome": outcome, "ab": {a: ab[a] for a in ASPECTS}, "ba": {a: ba[a] for a in ASPECTS}}

    return per_item(calls, items, workers, progress)


def win_tie_lose(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per aspect: counts and percentages of win / tie / lose over judged items (+ `errors`: items left out)."""
    table: dict[str, dict[str, float]] = {}
    judged = [r for r in results if "error" not in r]
    n = len(judged)
    for aspect in ASPECTS:
        row: dict[str, float] = {o: sum(r["outcome"][aspect] == o for r in judged) for o in OUTCOMES}
        row |= {f"{o}_pct": (100.0 * row[o] / n if n else 0.0) for o in OUTCOMES}
        row["errors"] = len(results) - n
        table[aspect] = row
    return table


def position_consistency(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per aspect, the % of judged items whose two orders agree (same winner, or tie both times)."""
    out = {}
    results = [r for r in results if "error" not in r]
    for aspect in ASPECTS:
        same = sum(_from_view(r["ab"][aspect], "A") == _from_view(r["ba"][aspect], "B") for r in results)
        out[aspect] = 100.0 * same / len(results) if results else 0.0
    return out


def pair_items(system: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]) -> list[PairItem]:
    """Join two prediction lists (rows with id, question, reference, prediction) on `id`."""
    base = {row["id"]: row for row in baseline}
    missing = [row["id"] for row in system if row["id"] not in base]
    if missing:
        raise DataError(f"baseline predictions lack id(s) {missing[:5]} (of {len(missing)})")
    return [PairItem(row["question"], row["reference"], row["prediction"], base[row["id"]]["prediction"])
            for row in system]
