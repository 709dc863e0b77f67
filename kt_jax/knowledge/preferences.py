"""Baseline preference pairs from k sampled answers per question, as KC records: RLAIF and FactTune.

- RLAIF (Lee et al. 2023): every two distinct answers of a question are compared by the backend's pairwise judge
  in both orders on completeness, factuality and logicality, reconciled as `eval.judge.reconcile` does; an answer's
  score is its wins minus its losses over all aspects and opponents.
- FactTune (Tian et al. 2023, "Fine-tuning Language Models for Factuality"): each answer's facts are extracted and
  each checked, by `verify` against the reference answer (`fact_check="verify"`) or by the FActScore-style
  `label_fact` against the reference and the judge's own knowledge (`fact_check="label_fact"`, supported only when
  labelled so); the score is fact precision = supported / extracted facts. An answer with no facts, or whose
  extract / check call was rejected for good, has no score and is left out (with a reject).
Pairing (`PreferenceConfig.pairing`): "best_vs_worst", the highest against the lowest score, or "all_pairs", every
pair of answers whose scores differ by more than `margin`. A pair whose scores differ by `margin` or less is a tie
and is skipped. Among equal scores the earlier answer of the sample wins the choice, so the output is deterministic.
Samples are rows {"question", "input" (optional), "reference", "answers": [k strings], "id" (optional)}; the first
`k` answers are used, stripped, with empty ones and repeats dropped (counted in the stats). `samples_from_predictions`
joins k predictions.jsonl files (`inference/generate_file.py`, one per sampling seed) into such rows by `id`.
Output records are `KCRecord(question, chosen, rejected, aspect="rlaif" | "facttune", input)` with empty reference
log-probs, written by `kt_jax.data.records` as LLaMA-Factory ranking rows. Every backend call goes through the
backend's cache (`CachedBackend.call`), so an interrupted build resumes and a re-run makes no call.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from kt_jax.data.records import KCRecord, check_fields, read_rows
from kt_jax.data.templates import question_text
from kt_jax.errors import ConfigError, DataError
from kt_jax.eval.judge import ASPECTS, RECONCILE, reconcile
from kt_jax.knowledge.backend import Outcome, call_many

METHODS = ("rlaif", "facttune")
PAIRINGS = ("best_vs_worst", "all_pairs")
FACT_CHECKS = ("verify", "label_fact")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """Settings of a baseline preference build (the DPO trainer, beta and gamma are the KC stage's)."""

    method: str = "rlaif"             # rlaif (pairwise judge) | facttune (fact precision)
    k: int = 4                        # sampled answers per question (the first k of each row are used)
    pairing: str = "best_vs_worst"    # best_vs_worst | all_pairs (every pair whose scores differ by > margin)
    margin: float = 0.0               # a pair needs score(chosen) - score(rejected) > margin; otherwise a tie
    reconcile: str = "strict"         # rlaif: how the judge's two answer orders combine (strict | sum)
    fact_check: str = "verify"        # facttune: verify (reference only) | label_fact (reference + judge knowledge)
    workers: int = 4                  # concurrent backend calls

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        for key, value, choices in (("method", self.method, METHODS), ("pairing", self.pairing, PAIRINGS),
                                    ("reconcile", self.reconcile, RECONCILE),
                                    ("fact_check", self.fact_check, FACT_CHECKS)):
            if value not in choices:
                raise ConfigError(f"preferences.{key}: {value!r} is not one of {', '.join(choices)}")
        if self.k < 2:
            raise ConfigError(f"preferences.k: need at least 2 answers per question, got {self.k}")
        if self.margin < 0:
            raise ConfigError(f"preferences.margin: must be >= 0, got {self.margin}")
        if self.workers < 1:
            raise ConfigError(f"preferences.workers: must be >= 1, got {self.workers}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question with its reference answer and its distinct sampled answers (in sample order)."""

    id: Any
    question: str
    input: str
    reference: str
    answers: tuple[str, ...]


@dataclasses.dataclass
class PreferenceSet:
    """What a build made: KC records, rejects ({id, stage, question, reason}), per-question scores and counts."""

    records: list[KCRecord]
    rejects: list[dict[str, Any]]
    scores: list[dict[str, Any]]
    stats: Counter


def parse_samples(rows: Sequence[Any], k: int, where: str = "samples") -> tuple[list[Sample], Counter]:
    """Validated samples (first k answers, stripped, empty and repeated ones dropped) and the counts of drops."""
    samples, stats = [], Counter()
    for i, row in enumerate(rows):
        at = f"{where}: row {i}"
        check_fields(row, at, non_empty=("question", "reference"), optional=("input",), string_lists=("answers",))
        answers = row["answers"]
        if len(answers) < k:
            raise DataError(f"{at}: field 'answers': {len(answers)} answer(s), fewer than k={k}")
        kept: list[str] = []
        for answer in (a.strip() for a in answers[:k]):
            if not answer:
                stats["answers_empty"] += 1
            elif answer in kept:
                stats["answers_repeated"] += 1
            else:
                kept.append(answer)
        samples.append(Sample(row.get("id", i), row["question"], row.get("input", ""), row["reference"], tuple(kept)))
    return samples, stats


def samples_from_predictions(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Sample rows joined by `id` from predictions.jsonl files (one per seed): answers in the order of `paths`."""
    by_id: dict[Any, dict[str, Any]] = {}
    for n, path in enumerate(paths):
        seen = set()
        for i, row in enumerate(read_rows(path)):
            at = f"{path}: row {i}"
            missing = [k for k in ("id", "question", "reference", "prediction") if k not in row]
            if missing:
                raise DataError(f"{at}: missing field(s) {', '.join(missing)}")
            key = row["id"]
            if key in seen:
                raise DataError(f"{at}: field 'id': {key!r} appears twice")
            seen.add(key)
            if n == 0:
                by_id[key] = {"id": key, "question": row["question"], "input": row.get("input", ""),
                              "reference": row["reference"], "answers": []}
            elif key not in by_id or by_id[key]["question"] != row["question"]:
                raise DataError(f"{at}: field 'id': {key!r} is not the same question in {paths[0]}")
            by_id[key]["answers"].append(row["prediction"])
        lacking = [k for k in by_id if k not in seen]
        if lacking:
            raise DataError(f"{path}: lacks id(s) {lacking[:5]} (of {len(lacking)}) that {paths[0]} has")
    return list(by_id.values())  # the first file's order


def pair_indices(scores: Sequence[float | None], pairing: str, margin: float) -> list[tuple[int, int]]:
    """(chosen, rejected) answer indices by `pairing` (see the module docstring); None scores take no part."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return []
    if pairing == "best_vs_worst":
        best = max(scored, key=lambda i: (scores[i], -i))   # the earlier answer among equals
        worst = min(scored, key=lambda i: (scores[i], i))
        return [(best, worst)] if scores[best] - scores[worst] > margin else []
    pairs = []
    for i, j in combinations(scored, 2):
        if scores[i] - scores[j] > margin:
            pairs.append((i, j))
        elif scores[j] - scores[i] > margin:
            pairs.append((j, i))
    return pairs


def call_unique(backend: Any, op: str, datas: Sequence[dict[str, Any]], *, workers: int,
                progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """`call_many` with each distinct input called once (a fact shared by two answers is verified once)."""
    index: dict[str, int] = {}
    unique: list[dict[str, Any]] = []
    for data in datas:
        key = json.dumps(data, sort_keys=True, ensure_ascii=False)
        if key not in index:
            index[key] = len(unique)
            unique.append(data)
    outs = call_many(backend, op, unique, workers=workers, progress=progress)
    return [outs[index[json.dumps(d, sort_keys=True, ensure_ascii=False)]] for d in datas]


def _reject(sample: Sample, stage: str, reason: str) -> dict[str, Any]:
    return {"id": sample.id, "stage": stage, "question": sample.question, "reason": reason}


def _pairs(samples: Sequence[Sample], scores: Sequence[list[float | None]], cfg: PreferenceConfig,
           rejects: list[dict[str, Any]], stats: Counter) -> PreferenceSet:
    """Records from per-answer scores; a question without a pair becomes a reject saying why."""
    records, table = [], []
    for sample, per in zip(samples, scores, strict=True):
        table.append({"id": sample.id, "question": sample.question, "answers": list(sample.answers), "scores": per})
        valid = [s for s in per if s is not None]
        if len(valid) < 2:
            stats["questions_unscored"] += 1
            rejects.append(_reject(sample, "pairing", f"{len(valid)} scored answer(s); need at least 2"))
            continue
        pairs = pair_indices(per, cfg.pairing, cfg.margin)
        if not pairs:
            stats["questions_tied"] += 1
            rejects.append(_reject(sample, "pairing", f"tie: scores {valid} differ by at most margin {cfg.margin}"))
            continue
        for chosen, rejected in pairs:
            records.append(KCRecord(sample.question, sample.answers[chosen], sample.answers[rejected], cfg.method,
                                    sample.input))
        stats["pairs"] += len(pairs)
    return PreferenceSet(records, rejects, table, stats)


def _prepare(samples: Sequence[dict[str, Any]], cfg: PreferenceConfig | None, method: str,
             where: str) -> tuple[PreferenceConfig, list[Sample], Counter]:
    cfg = dataclasses.replace(cfg or PreferenceConfig(), method=method)
    cfg.validate()
    parsed, stats = parse_samples(samples, cfg.k, where)
    stats["questions"] = len(parsed)
    return cfg, parsed, stats


def build_rlaif_pairs(backend: Any, samples: Sequence[dict[str, Any]], cfg: PreferenceConfig | None = None, *,
                      where: str = "samples", progress: Callable[[int], None] | None = None) -> PreferenceSet:
    """RLAIF pairs: answers ranked by the pairwise judge (both orders, three aspects); see the module docstring."""
    cfg, parsed, stats = _prepare(samples, cfg, "rlaif", where)
    calls: list[tuple[int, int, int]] = []  # (sample, answer i, answer j) for each unordered pair
    datas: list[dict[str, Any]] = []
    for n, s in enumerate(parsed):
        q = question_text(s.question, s.input)
        for i, j in combinations(range(len(s.answers)), 2):
            calls.append((n, i, j))
            for a, b in ((i, j), (j, i)):
                datas.append({"question": q, "reference": s.reference, "answer_a": s.answers[a],
                              "answer_b": s.answers[b]})
    verdicts = call_unique(backend, "judge", datas, workers=cfg.workers, progress=progress)
    scores: list[list[float | None]] = [[0.0] * len(s.answers) for s in parsed]
    failed: dict[int, str] = {}
    for c, (n, i, j) in enumerate(calls):
        ab, ba = verdicts[2 * c], verdicts[2 * c + 1]
        if not (ab.ok and ba.ok):
            failed.setdefault(n, ab.error or ba.error or "")
            continue
        for aspect in ASPECTS:
            outcome = reconcile(ab.value[aspect], ba.value[aspect], cfg.reconcile)
            delta = {"win": 1.0, "lose": -1.0, "tie": 0.0}[outcome]
            scores[n][i] += delta
            scores[n][j] -= delta
    rejects = []
    for n, reason in sorted(failed.items()):  # a missing comparison would bias the ranking: drop the question
        rejects.append(_reject(parsed[n], "judge", reason))
        scores[n] = [None] * len(parsed[n].answers)
    stats["judge_requests"] = len(datas)
    return _pairs(parsed, scores, cfg, rejects, stats)


def build_facttune_pairs(backend: Any, samples: Sequence[dict[str, Any]], cfg: PreferenceConfig | None = None, *,
                         where: str = "samples", progress: Callable[[int], None] | None = None) -> PreferenceSet:
    """FactTune pairs: answers ranked by fact precision (supported / extracted facts); see the module docstring."""
    cfg, parsed, stats = _prepare(samples, cfg, "facttune", where)
    answers = [(n, i) for n, s in enumerate(parsed) for i in range(len(s.answers))]
    q_of = [question_text(s.question, s.input) for s in parsed]
    extracted = call_unique(backend, "extract", [{"question": q_of[n], "answer": parsed[n].answers[i]}
                                               for n, i in answers], workers=cfg.workers, progress=progress)
    checks: list[tuple[int, int]] = []  # (sample, answer) per verify call
    datas: list[dict[str, Any]] = []
    for (n, i), facts in zip(answers, extracted, strict=True):
        for fact in facts.value if facts.ok else []:
            checks.append((n, i))
            datas.append({"question": q_of[n], "fact": fact, "reference": parsed[n].reference})
    verified = call_unique(backend, cfg.fact_check, datas, workers=cfg.workers, progress=progress)
    results: dict[tuple[int, int], list[Outcome]] = {}
    for key, outcome in zip(checks, verified, strict=True):
        results.setdefault(key, []).append(outcome)
    supported = (lambda v: v is True) if cfg.fact_check == "verify" else (lambda v: v == "supported")
    scores: list[list[float | None]] = [[None] * len(s.answers) for s in parsed]
    rejects = []
    for (n, i), facts in zip(answers, extracted, strict=True):
        outs = results.get((n, i), [])
        error = facts.error or next((o.error for o in outs if not o.ok), None)
        if error is not None or not outs:
            stats["answers_unscored"] += 1
            rejects.append(_reject(parsed[n], f"facttune (answer {i})", error or "no facts extracted"))
            continue
        scores[n][i] = sum(supported(o.value) for o in outs) / len(outs)
    stats["extract_requests"], stats["check_requests"] = len(answers), len(datas)
    return _pairs(parsed, scores, cfg, rejects, stats)


def build_preferences(backend: Any, samples: Sequence[dict[str, Any]], cfg: PreferenceConfig, *,
                      where: str = "samples", progress: Callable[[int], None] | None = None) -> PreferenceSet:
    """The pairs of `cfg.method` (rlaif | facttune)."""
    cfg.validate()
    build = build_rlaif_pairs if cfg.method == "rlaif" else build_facttune_pairs
    return build(backend, samples, cfg, where=where, progress=progress)
