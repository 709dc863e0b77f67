"""Fine-grained fact evaluation: the atomic facts of each answer, each verified against the reference answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kt_jax.eval.judge import per_item


def evaluate_facts(
    backend: Any, items: Sequence[tuple[str, str, str]], *, workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """For each (question, answer, reference): {"facts": [...], "correct": [bool, ...]} via extract + verify.

    An item whose backend call was rejected for good gets {"error": reason} and is left out of the summary.
    """

    def one(item: tuple[str, str, str]) -> dict[str, Any]:
        question, answer, reference = item
        facts = list(backend.extract(question, answer)) if answer.strip() else []
        return {"facts": facts, "correct": [bool(backend.verify(question, fact, reference)) for fact in facts]}

    return per_item(one, items, workers, progress)


def fact_summary(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean facts per answer, total facts, % correct over all facts (micro) and per answer (macro), errors."""
    errors = sum("error" in r for r in results)
    results = [r for r in results if "error" not in r]
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
        "errors": errors,
    }
