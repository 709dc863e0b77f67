"""Knowledge-aware augmentation (KA): extract facts -> score their perplexity -> keep the top alpha -> rewrite.

The KA set is every original QA pair (provenance "original") plus one fine-grained QA pair per question rewritten
from its most difficult facts (provenance "rewritten", `source_question` = the original question). A fact's
difficulty is the model's perplexity of the fact given the question (`inference.scoring.fact_perplexities`, passed
in as a `scorer` so this module never loads a model itself). Top alpha: the `ka_keep_count(n, alpha, rounding)` facts
with the highest perplexity, kept in their order in the answer: ceil(alpha * n) under `rounding="figure"` (the paper's
framework figure keeps 2 of 3 facts at alpha = 0.5; the default), max(1, floor(alpha * n)) under "floor_round" (kt-jax
before issue 14). Items the backend rejects are returned as rejects with
their reason, never dropped silently.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kt_jax.data.records import KARecord, QARecord
from kt_jax.data.templates import question_text
from kt_jax.errors import DataError
from kt_jax.knowledge.backend import call_many

Scorer = Callable[[Sequence[tuple[str, Sequence[str]]]], list[list[float]]]
ROUNDINGS = ("figure", "floor_round")  # KA keep / KC delete: ceil / floor ("figure"), floor / round
ROUNDING_EPS = 1e-9  # alpha*n and beta*n land a hair off integers in binary (0.7 * 10 = 7.000000000000001)


def check_rounding(rounding: str) -> None:
    """Raise DataError unless `rounding` is one of ROUNDINGS."""
    if rounding not in ROUNDINGS:
        raise DataError(f"rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")


def ka_keep_count(n: int, alpha: float, rounding: str = "figure") -> int:
    """How many of n facts KA keeps: ceil(alpha*n) ("figure") or max(1, floor(alpha*n)) ("floor_round"); n >= 1."""
    check_rounding(rounding)
    if rounding == "figure":
        return min(n, max(1, math.ceil(alpha * n - ROUNDING_EPS)))
    return min(n, max(1, math.floor(alpha * n + ROUNDING_EPS)))


def extract_facts(backend: Any, records: Sequence[QARecord], *, workers: int = 4,
                  progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One row per record: {id, question, input, answer, facts} (+ `error`, with no facts, when rejected)."""
    datas = [{"question": question_text(r.question, r.input), "answer": r.answer} for r in records]
    outcomes = call_many(backend, "extract", datas, workers=workers, progress=progress)
    rows = []
    for i, (rec, out) in enumerate(zip(records, outcomes, strict=True)):
        row: dict[str, Any] = {"id": i, "question": rec.question, "input": rec.input, "answer": rec.answer}
        row.update({"facts": out.value} if out.ok else {"facts": [], "error": out.error})  # `kt-jax score` reads it
        rows.append(row)
    return rows


def select_difficult(facts: Sequence[str], perplexities: Sequence[float | None], alpha: float = 0.5,
                     rounding: str = "figure") -> list[str]:
    """The `ka_keep_count(n, alpha, rounding)` facts with the highest perplexity, in answer order (NaN/None last)."""
    if len(facts) != len(perplexities):
        raise DataError(f"select_difficult: {len(facts)} facts but {len(perplexities)} perplexities")
    if not facts:
        return []
    if not 0.0 < alpha <= 1.0:
        raise DataError(f"select_difficult: alpha must be in (0, 1], got {alpha}")
    k = ka_keep_count(len(facts), alpha, rounding)
    ppl = [p if p is not None and p == p else -math.inf for p in perplexities]  # NaN/None (no tokens) rank last
    ranked = sorted(range(len(facts)), key=lambda i: (-ppl[i], i))[:k]
    return [facts[i] for i in sorted(ranked)]


def attach_perplexities(rows: Sequence[dict[str, Any]], scorer: Scorer) -> list[dict[str, Any]]:
    """Rows with `perplexities` added (rows without facts are passed through unchanged)."""
    todo = [r for r in rows if r.get("facts")]
    items = [(question_text(r["question"], r["input"]), r["facts"]) for r in todo]
    ppls = scorer(items) if items else []
    if len(ppls) != len(items):
        raise DataError(f"scorer returned {len(ppls)} results for {len(items)} answers")
    scored = {id(r): p for r, p in zip(todo, ppls, strict=True)}
    out = []
    for r in rows:
        if id(r) in scored:
            if len(scored[id(r)]) != len(r["facts"]):
                raise DataError(f"scorer: row {r['id']}: {len(scored[id(r)])} perplexities for {len(r['facts'])} facts")
            r = {**r, "perplexities": [None if x is None or x != x else float(x) for x in scored[id(r)]]}
        out.append(r)
    return out


def build_ka(backend: Any, scored_rows: Sequence[dict[str, Any]], *, alpha: float = 0.5, rounding: str = "figure",
             workers: int = 4, progress: Callable[[int], None] | None = None
             ) -> tuple[list[KARecord], list[dict[str, Any]]]:
    """(KA records, rejects): originals + one rewritten fine-grained pair per scored row."""
    todo = [r for r in scored_rows if r.get("facts") and "perplexities" in r]
    difficult = [select_difficult(r["facts"], r["perplexities"], alpha, rounding) for r in todo]
    datas = [{"question": question_text(r["question"], r["input"]), "facts": d}
             for r, d in zip(todo, difficult, strict=True)]
    outcomes = call_many(backend, "rewrite", datas, workers=workers, progress=progress)
    rewritten = {r["id"]: o for r, o in zip(todo, outcomes, strict=True)}
    records: list[KARecord] = []
    rejects: list[dict[str, Any]] = []
    for r in scored_rows:
        records.append(KARecord(r["question"], r["answer"], r["input"], "original"))
        if "error" in r:
            rejects.append({"id": r["id"], "stage": "extract", "question": r["question"], "reason": r["error"]})
            continue
        out = rewritten.get(r["id"])
        if out is None:
            continue
        if out.ok:
            q, a = out.value
            records.append(KARecord(q, a, "", "rewritten", r["question"]))
        else:
            rejects.append({"id": r["id"], "stage": "rewrite", "question": r["question"], "reason": out.error})
    return records, rejects


def file_scorer(path: str | Path) -> Scorer:
    """Perplexities read from a `kt-jax score` output (rows with `question`, `facts`, `ppl`), matched by content."""
    from kt_jax.data.records import read_rows

    table: dict[tuple[str, tuple[str, ...]], list[float | None]] = {}  # (question text, facts) -> ppl
    for i, row in enumerate(read_rows(path)):
        if not isinstance(row, dict) or not isinstance(row.get("ppl"), list):
            raise DataError(f"{path}: row {i}: field 'ppl': expected a list of perplexities")
        # a `kt-jax score` row is a facts.jsonl row (instruction in `question`, context in `input`) plus `ppl`
        key = (question_text(str(row.get("question")), str(row.get("input") or "")), tuple(row.get("facts", [])))
        table.setdefault(key, row["ppl"])

    def score(items: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
        out = []
        for question, facts in items:
            ppl = table.get((question, tuple(facts)))
            if ppl is None:
                raise DataError(f"{path}: no scored row for question {question[:60]!r} with these facts")
            out.append([math.nan if p is None else float(p) for p in ppl])
        return out

    return score


def lexical_scorer(texts: Sequence[str]) -> Scorer:
    """A model-free stand-in scorer: a fact's 'perplexity' is exp(mean word surprisal) under the unigram
    distribution of `texts` (rare-word facts rank as difficult). Low fidelity; use the model scorer for real runs."""
    counts = Counter(w for t in texts for w in re.findall(r"[a-z0-9']+", t.lower()))
    total = sum(counts.values()) + len(counts) + 1

    def ppl(fact: str) -> float:
        words = re.findall(r"[a-z0-9']+", fact.lower()) or [""]
        return math.exp(sum(-math.log((counts[w] + 1) / total) for w in words) / len(words))

    return lambda items: [[ppl(f) for f in facts] for _, facts in items]


def model_scorer(model: Any, tokenizer: Any, **kwargs: Any) -> Scorer:
    """The paper's scorer: per-fact perplexity under `model` given the question (kt_jax.inference.scoring)."""
    from kt_jax.inference.scoring import fact_perplexities

    return lambda items: fact_perplexities(model, tokenizer, items, **kwargs)
