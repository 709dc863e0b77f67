"""Knowledge-comparison (KC) preference pairs: for each question three pairs, one per aspect.

chosen = the backend's rephrasing of the original answer (the same for the three pairs). rejected =
- completeness: delete — drop `kc_delete_count(n, beta, rounding)` facts chosen at random (seeded per question):
  floor(beta * n) under `rounding="figure"` (the paper's framework figure deletes 1 of 3 at beta = 0.5; the default),
  round(beta * n) (Python's, half to even) under "floor_round"; always at least one deleted and one kept;
- factuality: revise — the backend makes every fact false (`revise_ratio` < 1 keeps some originals, at least one
  revised);
- logicality: shuffle — a random permutation of the facts that differs from the original order.
The disturbed facts become one answer by concatenation (`combine="concat"`, the original method) or by the
backend's `combine` (`combine="llm"`).
Answers with a single fact cannot lose a fact and keep one, nor be reordered: they give only the factuality pair
(counted as `single_fact` in the stats). A pair whose rejected text equals its chosen text is skipped and counted.
Output records are `KCRecord`s, written by `kt_jax.data.records` as LLaMA-Factory ranking rows
`{"instruction", "input", "output": [chosen, rejected], "aspect"}`. `kc_subset` drops one aspect's pairs (the paper's
-KCC / -KFC / -KLC ablations).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kt_jax.data.records import KCRecord
from kt_jax.data.templates import question_text
from kt_jax.errors import DataError
from kt_jax.knowledge.augment import ROUNDING_EPS, check_rounding
from kt_jax.knowledge.backend import Outcome, call_many
from kt_jax.knowledge.offline import combine_facts

ASPECT_OF = {"delete": "completeness", "revise": "factuality", "shuffle": "logicality"}
ABLATIONS = {"no_kcc": "completeness", "no_kfc": "factuality", "no_klc": "logicality"}  # system -> aspect it drops


def kc_delete_count(n: int, beta: float, rounding: str = "figure") -> int:
    """How many of n >= 2 facts the completeness pair deletes: floor(beta*n) ("figure") or round(beta*n)
    ("floor_round"), clipped to [1, n-1]."""
    check_rounding(rounding)
    d = math.floor(beta * n + ROUNDING_EPS) if rounding == "figure" else round(beta * n)
    return min(n - 1, max(1, d))


def kc_subset(records: Sequence[KCRecord], drop: str) -> list[KCRecord]:
    """The KC pairs without one comparison set: no_kcc (completeness), no_kfc (factuality), no_klc (logicality)."""
    if drop not in ABLATIONS:
        raise DataError(f"kc_subset: drop={drop!r} is not one of {', '.join(ABLATIONS)}")
    known = set(ABLATIONS.values())
    for i, r in enumerate(records):
        if r.aspect not in known:
            raise DataError(f"kc_subset: row {i}: field 'aspect' is {r.aspect!r}, not one of {sorted(known)} "
                            "(a KC file written by `kt-jax knowledge` carries it)")
    return [r for r in records if r.aspect != ABLATIONS[drop]]


def _rng(seed: int, question: str, what: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{what}|{question}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def delete_facts(facts: Sequence[str], beta: float, rng: random.Random, rounding: str = "figure") -> list[str]:
    """The facts minus `kc_delete_count` of them at random (at least one deleted and one kept; needs >= 2 facts)."""
    n = len(facts)
    if n < 2:
        raise DataError(f"delete_facts: need at least 2 facts, got {n}")
    if not 0.0 < beta < 1.0:
        raise DataError(f"delete_facts: beta must be in (0, 1), got {beta}")
    d = kc_delete_count(n, beta, rounding)
    gone = set(rng.sample(range(n), d))
    return [f for i, f in enumerate(facts) if i not in gone]


def shuffle_facts(facts: Sequence[str], rng: random.Random) -> list[str]:
    """A random permutation of the facts whose order differs from the original (needs >= 2 facts)."""
    n = len(facts)
    if n < 2:
        raise DataError(f"shuffle_facts: need at least 2 facts, got {n}")
    order = list(range(n))
    while order == list(range(n)):
        rng.shuffle(order)
    return [facts[i] for i in order]


def mix_revised(facts: Sequence[str], revised: Sequence[str], ratio: float, rng: random.Random) -> list[str]:
    """Each fact replaced by its revision for a `ratio` share of positions (at least one)."""
    if len(revised) != len(facts):
        raise DataError(f"revise returned {len(revised)} facts for {len(facts)}")
    k = max(1, round(ratio * len(facts)))
    chosen = set(rng.sample(range(len(facts)), min(k, len(facts))))
    return [revised[i] if i in chosen else f for i, f in enumerate(facts)]


def build_kc(backend: Any, fact_rows: Sequence[dict[str, Any]], *, beta: float = 0.5, revise_ratio: float = 1.0,
             combine: str = "concat", rounding: str = "figure", seed: int = 0, workers: int = 4,
             progress: Callable[[int], None] | None = None) -> tuple[list[KCRecord], list[dict[str, Any]], Counter]:
    """(KC records, rejects, stats) from extracted-fact rows (see module docstring)."""
    if combine not in ("concat", "llm"):
        raise DataError(f"build_kc: combine must be 'concat' or 'llm', got {combine!r}")
    rows = [r for r in fact_rows if r.get("facts")]
    rejects = [{"id": r["id"], "stage": "extract", "question": r["question"], "reason": r.get("error", "no facts")}
               for r in fact_rows if not r.get("facts")]
    stats: Counter = Counter()
    q_of = {r["id"]: question_text(r["question"], r["input"]) for r in rows}
    chosen = call_many(backend, "rephrase", [{"question": q_of[r["id"]], "answer": r["answer"]} for r in rows],
                       workers=workers, progress=progress)
    revised = call_many(backend, "revise", [{"question": q_of[r["id"]], "facts": r["facts"]} for r in rows],
                        workers=workers, progress=progress)
    disturbed: list[tuple[dict[str, Any], str, list[str]]] = []  # (row, kind, facts)
    for r, rev in zip(rows, revised, strict=True):
        facts, q = r["facts"], r["question"]
        if len(facts) >= 2:
            disturbed.append((r, "delete", delete_facts(facts, beta, _rng(seed, q, "delete"), rounding)))
        else:
            stats["single_fact"] += 1
        if rev.ok:
            disturbed.append((r, "revise", mix_revised(facts, rev.value, revise_ratio, _rng(seed, q, "revise"))))
        else:
            rejects.append({"id": r["id"], "stage": "revise", "question": q, "reason": rev.error})
        if len(facts) >= 2:
            disturbed.append((r, "shuffle", shuffle_facts(facts, _rng(seed, q, "shuffle"))))
    if combine == "llm":
        texts = call_many(backend, "combine", [{"question": q_of[r["id"]], "facts": f} for r, _, f in disturbed],
                          workers=workers, progress=progress)
    else:
        texts = [Outcome(value=combine_facts(f)) for _, _, f in disturbed]
    chosen_of = {r["id"]: c for r, c in zip(rows, chosen, strict=True)}
    records: list[KCRecord] = []
    for (r, kind, _), text in zip(disturbed, texts, strict=True):
        c = chosen_of[r["id"]]
        if not c.ok:
            stats[f"{kind}_no_chosen"] += 1
            continue
        if not text.ok:
            rejects.append({"id": r["id"], "stage": f"combine ({kind})", "question": r["question"],
                            "reason": text.error})
            continue
        if text.value.strip() == c.value.strip():
            stats[f"{kind}_same_as_chosen"] += 1
            continue
        records.append(KCRecord(r["question"], c.value, text.value, ASPECT_OF[kind], r["input"]))
        stats[ASPECT_OF[kind]] += 1
    for r, c in zip(rows, chosen, strict=True):
        if not c.ok:
            rejects.append({"id": r["id"], "stage": "rephrase", "question": r["question"], "reason": c.error})
    return records, rejects, stats
