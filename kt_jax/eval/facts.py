"""Fine-grained fact evaluation: the atomic facts of each answer, each verified against the reference answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def evaluate_facts(
    backend: Any, items: Sequence[tuple[str, str, str]], *, workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """For each (question, answer, reference): {"facts": [...], "correct": [bool, ...]} via extract + verify."""

    def one(item: tuple[str, str, str]) -> dict[str, Any]:
        question, answer, reference = item
        facts = list(backend.extract(question, answer)) if answer.strip() else []
        correct = [bool(backend.verify(question, fact, reference)) for fact in facts]
        if progress is not None:
            progress(1)
        return {"facts": facts, "correct": correct}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, items))


def fact_summary(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean facts per answer, total facts, % correct over all facts (micro) and per answer (macro)."""
    counts = [len(r["facts"]) for r in results]
    correct = [sum(r["correct"]) for r in results]
    total = sum(counts)
    per_answer = [c / n for c, n in zip(correct, counts, strict=True) if n]
    return {
        "answers": len(results),
        "facts_per_answer": total / len(results) if results else 0.0,
        "facts_total": total,
        "correct_pct": 100.0 * sum(correct) / total if total else 0.0,
        "correct_pct_macro": 100.0 * sum(per_answer) / len(per_answer) if per_answer else 0.0,
    }
