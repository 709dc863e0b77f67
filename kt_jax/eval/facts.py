"""Fine-grained fact evaluation: the atomic facts of each answer, each checked by the knowledge backend.

Two methods (`FACT_METHODS`):
- "factscore" (FActScore style, Min et al. 2023): each fact labelled supported, contradicted or not_verifiable
  against the reference answer AND the judge's own knowledge (`label_fact`), so a true fact the ~90-word reference
  omits is not an error. Summary: facts, supported, contradicted and not verifiable per answer; precision =
  supported / (supported + contradicted); supported / all facts (micro) and its mean per answer (FActScore's score).
- "reference": each fact verified against the reference answer only (`verify`), so an omitted true fact counts
  as not correct; kept for comparison with earlier runs. Summary: facts per answer and % correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kt_jax.errors import BackendError, ConfigError, DataError
from kt_jax.eval.judge import per_item

FACT_METHODS = ("factscore", "reference")
FACT_LABELS = ("supported", "contradicted", "not_verifiable")


def evaluate_facts(
    backend: Any, items: Sequence[tuple[str, str, str]], *, method: str = "reference", workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """For each (question, answer, reference): {"facts": [...], "correct": [bool]} ("reference") or
    {"facts": [...], "labels": [supported | contradicted | not_verifiable]} ("factscore").

    An item whose backend call was rejected for good gets {"error": reason} and is left out of the summary.
    """
    if method not in FACT_METHODS:
        raise ConfigError(f"fact method {method!r}; choose one of {FACT_METHODS}")
    prefetch = getattr(backend, "prefetch", None)
    if prefetch is not None:  # batch APIs: every uncached extract call at once (the checks depend on its answers)
        prefetch("extract", [{"question": q, "answer": a} for q, a, _ in items if a.strip()])

    def one(item: tuple[str, str, str]) -> dict[str, Any]:
        question, answer, reference = item
        facts = list(backend.extract(question, answer)) if answer.strip() else []
        if method == "reference":
            return {"facts": facts, "correct": [bool(backend.verify(question, fact, reference)) for fact in facts]}
        labels = [backend.label_fact(question, fact, reference) for fact in facts]
        bad = [x for x in labels if x not in FACT_LABELS]
        if bad:
            raise BackendError(f"label_fact for question {question[:60]!r}: label {bad[0]!r} is not one of "
                               f"{FACT_LABELS}")
        return {"facts": facts, "labels": labels}

    return per_item(one, items, workers, progress)


def _method_of(results: Sequence[dict[str, Any]]) -> str:
    kinds = {("labels" in r) for r in results}
    if len(kinds) > 1:
        raise DataError("fact results mix the 'factscore' (labels) and 'reference' (correct) methods")
    return "factscore" if kinds == {True} else "reference"


def fact_summary(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-method summary over the answers without errors (see the module docstring); `errors` counts the rest.

    Both: answers, facts_per_answer, facts_total, errors. reference: correct_pct (micro), correct_pct_macro.
    factscore: supported/contradicted/not_verifiable_per_answer, precision_pct = 100·S/(S+C), supported_pct =
    100·S/all facts, supported_pct_macro = mean over answers with facts of 100·S_i/facts_i.
    """
    errors = sum("error" in r for r in results)
    results = [r for r in results if "error" not in r]
    counts = [len(r["facts"]) for r in results]
    total = sum(counts)
    out: dict[str, float] = {"answers": len(results), "facts_per_answer": total / len(results) if results else 0.0,
                             "facts_total": total, "errors": errors}
    if _method_of(results) == "reference":
        correct = [sum(r["correct"]) for r in results]
        per_answer = [c / n for c, n in zip(correct, counts, strict=True) if n]
        return out | {"correct_pct": 100.0 * sum(correct) / total if total else 0.0,
                      "correct_pct_macro": 100.0 * sum(per_answer) / len(per_answer) if per_answer else 0.0}
    n = {label: sum(r["labels"].count(label) for r in results) for label in FACT_LABELS}
    for label in FACT_LABELS:
        out[f"{label}_per_answer"] = n[label] / len(results) if results else 0.0
    judged = n["supported"] + n["contradicted"]
    per_answer = [r["labels"].count("supported") / len(r["labels"]) for r in results if r["labels"]]
    return out | {"precision_pct": 100.0 * n["supported"] / judged if judged else 0.0,
                  "supported_pct": 100.0 * n["supported"] / total if total else 0.0,
                  "supported_pct_macro": 100.0 * sum(per_answer) / len(per_answer) if per_answer else 0.0}
