"""Exact fact checking of generated text against the world: text -> (entity, attribute, value) triples -> scores.

Parsing is lexical and robust to rewording: in each sentence the known names, vocabulary words, years and
numbers are found; the subject is the first entity named (a pronoun or no entity -> the entity in focus); every
other value is assigned to the subject's attribute of that value type, using the attribute keywords nearest the
value when the type is ambiguous (born/died years) and the inverse relation when the subject is the value's
entity ("X founded the Y Guild" -> (Y Guild, founder, X)). A keyword with an unknown capitalised name after it
("X was born in Zorbia") is a stated fact with a wrong value. A negated sentence states nothing.

Scores for one answer about entity E with gold attributes G:
  completeness = |G stated correctly| / |G|;  factuality = correct / stated (all stated triples, any entity);
  logicality = Kendall tau between the stated order of E's attributes (first mention) and the canonical order;
  hallucinated = stated triples whose (entity, attribute) does not exist in the world; wrong = exists, other value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from kt_jax.world.generator import GOODS as GOODS_WORDS
from kt_jax.world.generator import MATERIALS, PROFESSIONS, World
from kt_jax.world.schema import ENTITY_KINDS, SCHEMA, canonical_index

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBER = re.compile(r"(?<![\w,])(\d{1,3}(?:,\d{3})+|\d+)(?![\w]|,\d)")
_NEGATION = re.compile(r"\b(?:not|never|no longer)\b|n't\b|\bit is not true\b")
_CAPS = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*")
_FUNCTION_CAPS = {"The", "In", "As", "By", "At", "On", "After", "Before", "During", "His", "Her", "Its", "Their",
                  "He", "She", "It", "They", "This", "That", "Later", "Today", "Born"}
_MALE_FEMALE = {"he", "she", "his", "her", "him"}
_NEUTER = {"it", "its"}
_PLURAL = {"they", "their", "them"}
# (kind, attribute) -> the same fact seen from the value's side (kept consistent by the generator)
INVERSE = {("artefact", "maker"): "creation", ("person", "creation"): "maker"}


@dataclasses.dataclass(frozen=True)
class Triple:
    """A stated fact: entity id, attribute, value (int, vocabulary word, entity id, or "?Name" for unknown)."""

    entity: str
    attribute: str
    value: Any
    sentence: int


@dataclasses.dataclass
class FactReport:
    """Exact scores of one answer about one entity."""

    entity_id: str
    gold: list[tuple[str, Any]]
    stated: list[Triple]
    correct: list[Triple]
    wrong: list[Triple]
    hallucinated: list[Triple]
    recalled: int  # gold facts stated correctly
    off_target: int  # stated triples about other entities (not the asked one, nor an inverse of its facts)
    completeness: float
    factuality: float | None  # None when nothing was stated
    logicality: float | None  # None when fewer than two of the entity's facts were stated


@dataclasses.dataclass(frozen=True)
class _Mention:
    start: int
    end: int
    vtype: str
    value: Any


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall tau between a sequence of distinct ranks and its sorted order (1 = same order, -1 = reversed)."""
    n = len(order)
    if n < 2:
        raise ValueError("kendall_tau needs at least two items")
    conc = sum(1 if order[i] < order[j] else -1 for i in range(n) for j in range(i + 1, n))
    return conc / (n * (n - 1) / 2)


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


class Checker:
    """Parses text into triples of one world and scores answers exactly."""

    def __init__(self, world: World):
        self.world = world
        self.names: dict[str, tuple[str, Any]] = {}  # surface -> (value type, value)
        for ent in world.entities.values():
            self.names[ent.name] = (ent.kind, ent.id)
        for region in world.regions:
            self.names[region] = ("region", region)
        for river in world.rivers:
            self.names[river] = ("river", river)
        self._names_re = re.compile(rf"(?<![A-Za-z])(?:{_alternation(list(self.names))})(?![A-Za-z])")
        self.vocab = {**dict.fromkeys(PROFESSIONS, "profession"), **dict.fromkeys(GOODS_WORDS, "goods"),
                      **dict.fromkeys(MATERIALS, "material")}
        self._vocab_re = re.compile(rf"(?<![A-Za-z])(?:{_alternation(list(self.vocab))})(?![A-Za-z])", re.IGNORECASE)
        self._kw = {(kind, s.name): re.compile(rf"\b(?:{_alternation(s.keywords)})")
                    for kind, specs in SCHEMA.items() for s in specs}

    # ---- parsing ----------------------------------------------------------------------------------------------
    def entities_named(self, text: str) -> list[str]:
        """Ids of the world's entities named in `text`, in order of first mention."""
        out: list[str] = []
        for m in self._names_re.finditer(text):
            vtype, value = self.names[m.group(0)]
            if vtype in ENTITY_KINDS and value not in out:
                out.append(value)
        return out

    def _mentions(self, sentence: str) -> list[_Mention]:
        found = [_Mention(m.start(), m.end(), *self.names[m.group(0)]) for m in self._names_re.finditer(sentence)]
        found += [_Mention(m.start(), m.end(), self.vocab[m.group(0).lower()], m.group(0).lower())
                  for m in self._vocab_re.finditer(sentence)]
        for m in _NUMBER.finditer(sentence):
            digits = m.group(1)
            n = int(digits.replace(",", ""))
            is_year = "," not in digits and len(digits) == 4 and 1000 <= n <= 2099
            found.append(_Mention(m.start(), m.end(), "year" if is_year else "number", n))
        found.sort(key=lambda x: (x.start, -x.end))
        out: list[_Mention] = []
        for m in found:  # drop overlaps (names come first at equal start)
            if not out or m.start >= out[-1].end:
                out.append(m)
        return out

    def _keyword_hits(self, kind: str, attr: str, lower: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        hits = []
        for m in self._kw[(kind, attr)].finditer(lower):
            if not any(s < m.end() and m.start() < e for s, e in spans):
                hits.append((m.start(), m.end()))
        return hits

    def _resolve(self, subj_kind: str, m: _Mention, lower: str,
                 spans: list[tuple[int, int]]) -> tuple[str, bool] | None:
        """(attribute, inverse?) for value mention `m` of a subject of kind `subj_kind`, or None."""
        fwd = [s.name for s in SCHEMA[subj_kind] if s.value_type == m.vtype]
        inv = [s.name for s in SCHEMA[m.vtype] if s.value_type == subj_kind] if m.vtype in ENTITY_KINDS else []
        best: tuple[tuple[int, int], str, bool] | None = None
        for attrs, inverse, kind in ((fwd, False, subj_kind), (inv, True, m.vtype)):
            for attr in attrs:
                for ks, ke in self._keyword_hits(kind, attr, lower, spans):
                    dist = (0, m.start - ke) if ke <= m.start else (1, ks - m.end)
                    key = (dist[0], abs(dist[1]) * 2 + int(inverse))
                    if best is None or key < best[0]:
                        best = (key, attr, inverse)
        if best is not None:
            return best[1], best[2]
        if len(fwd) == 1:
            return fwd[0], False
        if not fwd and len(inv) == 1:
            return inv[0], True
        return None

    def triples(self, text: str, focus_id: str | None = None) -> list[Triple]:
        """All facts stated in `text`, in order; pronouns and subject-less sentences refer to the entity in focus."""
        ents = self.world.entities
        last = {"any": focus_id, "person": focus_id if focus_id and ents[focus_id].kind == "person" else None,
                "thing": focus_id if focus_id and ents[focus_id].kind != "person" else None}
        out: list[Triple] = []
        for idx, sentence in enumerate(s for s in _SENT_SPLIT.split(text) if s.strip()):
            sentence = sentence.strip().lstrip("-*• ").strip()
            lower = sentence.lower()
            if _NEGATION.search(lower):  # "X is not known for its salt" states no value
                continue
            mentions = self._mentions(sentence)
            spans = [(m.start, m.end) for m in mentions]
            first_word = lower.split(" ", 1)[0].strip(",;:")
            entity_mentions = [m for m in mentions if m.vtype in ENTITY_KINDS]
            subject, values = None, mentions
            if first_word in _MALE_FEMALE:
                subject = last["person"] or last["any"]
            elif first_word in _NEUTER:
                subject = last["thing"] or last["any"]
            elif first_word in _PLURAL or not entity_mentions:
                subject = last["any"]
            else:
                subject = entity_mentions[0].value
                values = [m for m in mentions if m is not entity_mentions[0]]
                last["any"] = subject
                last["person" if ents[subject].kind == "person" else "thing"] = subject
            if subject is None:
                continue
            kind = ents[subject].kind
            resolved: set[str] = set()
            for m in values:
                if m.value == subject:
                    continue
                got = self._resolve(kind, m, lower, spans)
                if got is None and m.vtype == "number":  # a malformed year ("died in 175") is a wrong year
                    m = dataclasses.replace(m, vtype="year")
                    got = self._resolve(kind, m, lower, spans)
                if got is None:
                    continue
                attr, inverse = got
                resolved.add(attr)
                out.append(Triple(m.value, attr, subject, idx) if inverse else Triple(subject, attr, m.value, idx))
            out += self._unknown_values(subject, kind, sentence, lower, spans, resolved, idx)
        return out

    def _unknown_values(self, subject: str, kind: str, sentence: str, lower: str, spans: list[tuple[int, int]],
                        resolved: set[str], idx: int) -> list[Triple]:
        """Name-valued attributes whose keyword is followed by a capitalised name the world does not know."""
        unknown = [m for m in _CAPS.finditer(sentence) if m.start() > 0 and m.group(0) not in _FUNCTION_CAPS
                   and not any(s < m.end() and m.start() < e for s, e in spans)]
        if not unknown:
            return []
        out = []
        for spec in SCHEMA[kind]:
            if spec.name in resolved or spec.value_type in ("year", "number", "profession", "goods", "material"):
                continue
            for _, ke in self._keyword_hits(kind, spec.name, lower, spans):
                after = [m for m in unknown if m.start() >= ke]
                if after:
                    words = after[0].group(0).split()
                    name = " ".join(w for w in words if w not in _FUNCTION_CAPS) or after[0].group(0)
                    out.append(Triple(subject, spec.name, "?" + name, idx))
                    resolved.add(spec.name)
                    break
        return out

    # ---- scoring ----------------------------------------------------------------------------------------------
    def gold_value(self, entity_id: str, attr: str) -> Any:
        """The world's value of (entity, attribute), or None when the entity has no such attribute."""
        ent = self.world.entities.get(entity_id)
        return None if ent is None else ent.facts.get(attr)

    def _about(self, t: Triple, entity_id: str) -> str | None:
        """The target's attribute that triple `t` states (directly, or as an inverse like maker <-> creation)."""
        if t.entity == entity_id:
            return t.attribute
        if t.value == entity_id and t.entity in self.world.entities:
            return INVERSE.get((self.world.entities[t.entity].kind, t.attribute))
        return None

    def check(self, text: str, entity_id: str, attributes: Sequence[str] | None = None) -> FactReport:
        """Score an answer about `entity_id`; `attributes` = the gold attributes asked for (default: all)."""
        ent = self.world.entities[entity_id]
        gold = [(a, v) for a, v in ent.ordered_facts() if attributes is None or a in attributes]
        stated: list[Triple] = []
        seen: set[tuple[str, str, Any]] = set()
        for t in self.triples(text, entity_id):
            if (t.entity, t.attribute, t.value) not in seen:
                seen.add((t.entity, t.attribute, t.value))
                stated.append(t)
        correct, wrong, halluc = [], [], []
        for t in stated:
            gv = self.gold_value(t.entity, t.attribute)
            (halluc if gv is None else correct if gv == t.value else wrong).append(t)
        ok = {self._about(t, entity_id) for t in correct}
        recalled = sum(a in ok for a, _ in gold)
        order: list[int] = []
        for t in stated:
            attr = self._about(t, entity_id)
            if attr in ent.facts:
                rank = canonical_index(ent.kind, attr)
                if rank not in order:
                    order.append(rank)
        off_target = sum(self._about(t, entity_id) is None for t in stated)
        return FactReport(
            entity_id, gold, stated, correct, wrong, halluc, recalled, off_target,
            completeness=recalled / len(gold) if gold else 1.0,
            factuality=len(correct) / len(stated) if stated else None,
            logicality=kendall_tau(order) if len(order) >= 2 else None,
        )


def summarize(reports: Sequence[FactReport]) -> dict[str, float]:
    """Aggregate scores: completeness (mean), recall (micro), factuality (micro/macro), logicality, counts."""
    n = len(reports)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    stated = sum(len(r.stated) for r in reports)
    facts = [r.factuality for r in reports if r.factuality is not None]
    logic = [r.logicality for r in reports if r.logicality is not None]
    return {
        "answers": n,
        "completeness": mean([r.completeness for r in reports]),
        "recall_micro": sum(r.recalled for r in reports) / max(1, sum(len(r.gold) for r in reports)),
        "factuality": sum(len(r.correct) for r in reports) / stated if stated else float("nan"),
        "factuality_macro": mean(facts),
        "logicality": mean(logic),
        "stated_per_answer": stated / n if n else float("nan"),
        "wrong_per_answer": sum(len(r.wrong) for r in reports) / n if n else float("nan"),
        "hallucinated_per_answer": sum(len(r.hallucinated) for r in reports) / n if n else float("nan"),
        "off_target_per_answer": sum(r.off_target for r in reports) / n if n else float("nan"),
    }


def per_question(reports: Sequence[FactReport]) -> list[dict[str, Any]]:
    """One row of scores per answer (same order), the values `summarize` aggregates, for paired statistics."""
    return [{"entity_id": r.entity_id, "completeness": r.completeness, "factuality": r.factuality,
             "logicality": r.logicality, "recall": r.recalled / len(r.gold) if r.gold else 1.0,
             "recalled": r.recalled, "gold": len(r.gold), "stated": len(r.stated), "correct": len(r.correct),
             "wrong": len(r.wrong), "hallucinated": len(r.hallucinated), "off_target": r.off_target}
            for r in reports]


def evaluate_answers(world: World, questions: Sequence[Any], answers: Sequence[str]
                     ) -> tuple[dict[str, float], list[FactReport]]:
    """Score answers to world questions (`render.Question`s, e.g. from `load_questions`): (summary, reports)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    checker = Checker(world)
    reports = [checker.check(a, q.entity_id, q.attributes) for q, a in zip(questions, answers, strict=True)]
    return summarize(reports), reports
