"""The `world` knowledge backend: what a perfect LLM would return for each operation on world text.

Every operation reads text through the world's exact checker (`kt_jax.world.checker.Checker`), so a world run
measures the training recipe, not the stand-in. The entity in focus is the first entity the question names.
- extract: one fact per stated world fact, in order; a sentence stating one fact about a subject it names is kept
  verbatim, any other (pronoun subject, two facts) is rewritten as one schema sentence per fact; a sentence the
  checker finds no world fact in (a claim outside the schema, a negation) is kept as written.
- rewrite: the schema's narrow questions covering the difficult facts' attributes (greedy fewest questions; an
  attribute no narrow question asks for gets "What is the <label> of <entity>?"); the answer states, in canonical
  order, the difficult facts as given plus any other attribute those questions ask for (its canonical sentence
  from the world), so the pair reads like a test item; facts about no attribute of the entity are appended.
- revise: per fact, the value replaced by another value of the same attribute (or, failing that, of the same
  type) that occurs in the world: plausible and false, never an invented name, never a negation. A new year keeps
  the entity's dates in order (born before died, founded before dissolved) when any candidate does.
- rephrase / combine: each fact in the schema wording chosen for its (question, entity, attribute), always one of
  the alternative (non-canonical) templates; the two share the choice, so a KC pair built with the backend's
  `combine` (`combine: llm`) differs in content only, not in wording. No marker text is ever added.
- judge: checker scores of both answers about the facts the reference states: completeness (facts recalled),
  factuality (fewer wrong or invented facts), logicality (Kendall tau; "tie" unless both are defined).
- verify: the fact states at least one world fact and every fact it states is true in the world.
- label_fact: supported (verify holds), contradicted (a stated fact the world does not hold: the world is closed),
  not_verifiable (no world fact stated), whatever the reference omits.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

from kt_jax.knowledge.backend import CachedBackend
from kt_jax.knowledge.cache import KnowledgeCache
from kt_jax.world.checker import INVERSE, Checker, Triple
from kt_jax.world.generator import GOODS, MATERIALS, PROFESSIONS, World
from kt_jax.world.render import value_text
from kt_jax.world.schema import NARROW_QUESTIONS, SCHEMA, attr_spec

_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_PRONOUN_START = re.compile(r"^(?:he|she|it|they|his|her|its|their)\b", re.IGNORECASE)
_VOCAB = {"profession": PROFESSIONS, "goods": GOODS, "material": MATERIALS}

Fact = tuple[str, str, Any]  # (subject entity id, attribute, value) seen from the focus entity's side


def _stable(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def _sentence_case(text: str) -> str:
    text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
    return text[:1].upper() + text[1:]


class WorldBackend(CachedBackend):
    """Exact knowledge operations on the text of one generated world (see the module docstring)."""

    name = "world"
    rules_version = "world-rules-1"  # the cache's model identity: bump it when a rule changes an answer

    def __init__(self, world: str | Path, cache: KnowledgeCache | str | Path | bool | None = None, *,
                 validation_retries: int = 0, retry_rejects: bool = False):
        super().__init__(self.rules_version, cache, validation_retries=validation_retries,
                         retry_rejects=retry_rejects)
        self.world_path = Path(world)
        self.world = World.load(self.world_path)
        self.checker = Checker(self.world)
        self._identity = f"{self.model}:{hashlib.sha256(self.world_path.read_bytes()).hexdigest()[:12]}"

    def cache_identity(self) -> str:
        """Rules version plus a digest of world.json (another world gives other answers)."""
        return self._identity

    # -- reading text ------------------------------------------------------------------------------------------
    def focus(self, question: str, *texts: str) -> str:
        """The entity in focus: the first one the question names, else the first subject stated in `texts`."""
        named = self.checker.entities_named(question)
        if named:
            return named[0]
        for text in texts:
            triples = self.checker.triples(text)
            if triples:
                return triples[0].entity
        raise ValueError(f"no world entity named in the question {question[:80]!r} or its text")

    def _oriented(self, t: Triple, focus: str) -> Fact:
        """A triple as (subject, attribute, value), from the focus's side when it is an inverse (maker/creation)."""
        if t.entity != focus and t.value == focus and t.entity in self.world.entities:
            inverse = INVERSE.get((self.world.entities[t.entity].kind, t.attribute))
            if inverse is not None:
                return focus, inverse, t.entity
        return t.entity, t.attribute, t.value

    def facts(self, text: str, focus: str, keep_empty: bool = False) -> list[tuple[str, list[Fact]]]:
        """(sentence, its facts) for every sentence of `text` that states a world fact (`keep_empty`: every one)."""
        sentences = [s.strip() for s in _SENTENCES.split(text) if s.strip()]
        grouped: dict[int, list[Fact]] = {}
        for t in self.checker.triples(text, focus):
            fact = self._oriented(t, focus)
            if fact not in grouped.setdefault(t.sentence, []):
                grouped[t.sentence].append(fact)
        return [(s, grouped.get(i, [])) for i, s in enumerate(sentences) if keep_empty or i in grouped]

    def render(self, fact: Fact, variant: int) -> str:
        """One schema sentence stating `fact` in template `variant` (values the world lacks keep their name)."""
        subject, attr, value = fact
        ent = self.world.entities[subject]
        spec = attr_spec(ent.kind, attr)
        shown = value[1:] if isinstance(value, str) and value.startswith("?") else value_text(self.world, value)
        return _sentence_case(spec.templates[variant % len(spec.templates)].format(e=ent.display, v=shown))

    def wording(self, question: str, fact: Fact) -> int:
        """The alternative template (index >= 1) used for `fact`'s attribute when answering `question`."""
        subject, attr, _ = fact
        n = len(attr_spec(self.world.entities[subject].kind, attr).templates)
        return 1 + _stable(f"{question}|{subject}|{attr}") % (n - 1)

    # -- operations --------------------------------------------------------------------------------------------
    def _compute(self, op: str, data: dict[str, Any], attempt: int) -> dict[str, Any]:
        if op == "extract":
            return {"facts": self._extract(data["question"], data["answer"])}
        if op == "rewrite":
            return dict(zip(("question", "answer"), self._rewrite(data["question"], data["facts"]), strict=True))
        if op == "revise":
            focus = self.focus(data["question"], *data["facts"])
            done: dict[tuple[str, str], Any] = {}  # later facts keep their dates in order with earlier revisions
            return {"facts": [self.revise_fact(f, focus, done) for f in data["facts"]]}
        if op == "rephrase":
            return {"answer": self._reword(data["question"], [data["answer"]])}
        if op == "combine":
            return {"answer": self._reword(data["question"], data["facts"])}
        if op == "judge":
            return self._judge(data["question"], data["reference"], data["answer_a"], data["answer_b"])
        if op == "verify":
            return {"supported": self._verify(data["question"], data["fact"])}
        if op == "label_fact":
            return {"label": self._label(data["question"], data["fact"])}
        raise ValueError(f"unknown operation {op}")

    def _extract(self, question: str, answer: str) -> list[str]:
        focus = self.focus(question, answer)
        out: list[str] = []
        for sentence, facts in self.facts(answer, focus, keep_empty=True):
            # a claim the world cannot parse stays a fact as written (verify finds it unsupported), as an LLM's would
            if not facts or (len(facts) == 1 and facts[0][0] in self.checker.entities_named(sentence)
                             and not _PRONOUN_START.match(sentence)):
                out.append(sentence)
            else:
                out += [self.render(f, 0) for f in facts]
        if not out:
            raise ValueError("the answer is empty")
        return out

    def _rewrite(self, question: str, facts: list[str]) -> tuple[str, str]:
        focus = self.focus(question, *facts)
        ent = self.world.entities[focus]
        given: dict[str, str] = {}  # attribute of the focus -> the difficult fact stating it
        others: list[str] = []
        for text in facts:
            attrs = [a for _, found in self.facts(text, focus) for s, a, _ in found if s == focus]
            for a in attrs:
                given.setdefault(a, text.strip())
            if not attrs and text.strip():
                others.append(text.strip())
        if not given:
            raise ValueError(f"the difficult facts state nothing about {ent.display}")
        todo, asks = set(given), []
        while todo:  # fewest narrow questions covering the attributes (schema order on ties)
            q, attrs = max(NARROW_QUESTIONS[ent.kind], key=lambda qa: (len(todo & set(qa[1])), -len(set(qa[1]) - todo)))
            if not todo & set(attrs):
                break
            asks.append((_sentence_case(q.format(e=ent.display)), attrs))
            todo -= set(attrs)
        asks += [(f"What is the {attr_spec(ent.kind, a).label} of {ent.display}?", (a,)) for a in sorted(todo)]
        order = [s.name for s in SCHEMA[ent.kind]]
        asks.sort(key=lambda qa: min(order.index(a) for a in qa[1]))
        asked = [a for a in order if any(a in attrs for _, attrs in asks) and a in ent.facts]
        # a narrow question's other attribute is answered from the world, so the pair reads like a test item
        answer = [given.get(a) or self.render((focus, a, ent.facts[a]), 0) for a in asked]
        return " ".join(q for q, _ in asks), " ".join([*dict.fromkeys(answer), *others])

    def _pool(self, subject: str, attr: str, old: Any, done: dict[tuple[str, str], Any]) -> list[Any]:
        """Other values of `attr` of the same kind in the world (else other values of its value type), sorted."""
        kind = self.world.entities[subject].kind
        vtype = attr_spec(kind, attr).value_type
        exclude = {old, self.world.entities[subject].facts.get(attr), subject}
        same = {e.facts[attr] for e in self.world.entities.values() if e.kind == kind and attr in e.facts}
        if vtype in ("person", "org", "place", "artefact"):
            typed = {e.id for e in self.world.entities.values() if e.kind == vtype}
        elif vtype in ("year", "number"):
            typed = {v for e in self.world.entities.values() for a, v in e.facts.items()
                     if attr_spec(e.kind, a).value_type == vtype}
        else:
            typed = set({"region": self.world.regions, "river": self.world.rivers}.get(vtype, _VOCAB.get(vtype, ())))
        for values in (same, typed):
            pool = sorted((v for v in values if v not in exclude), key=str)
            if vtype == "year":  # keep the entity's dates in order (born before died, made before stolen), if any fit
                lo, hi = self._year_bounds(subject, attr, done)
                pool = [v for v in pool if lo < v < hi] or pool
            if pool:
                return pool
        raise ValueError(f"the world has no other value for {kind}.{attr}")

    def _year_bounds(self, subject: str, attr: str, done: dict[tuple[str, str], Any]) -> tuple[float, float]:
        """Bounds from the entity's years before and after `attr` in the schema's (chronological) order, true and
        revised ones alike, so that any mix of original and revised facts keeps its dates in order."""
        ent = self.world.entities[subject]
        names = [s.name for s in SCHEMA[ent.kind] if s.value_type == "year" and s.name in ent.facts]
        if attr not in names:
            return -math.inf, math.inf
        at = names.index(attr)
        values = lambda a: [ent.facts[a]] + ([done[(subject, a)]] if (subject, a) in done else [])
        lo = max((v for a in names[:at] for v in values(a)), default=-math.inf)
        hi = min((v for a in names[at + 1:] for v in values(a)), default=math.inf)
        return lo, hi

    def revise_fact(self, fact: str, focus: str, done: dict[tuple[str, str], Any] | None = None) -> str:
        """`fact` with its value swapped for another value of the same attribute in the world (`done`: the
        revisions made so far to the same answer, (subject, attribute) -> value; updated)."""
        done = {} if done is None else done
        found = [f for _, fs in self.facts(fact, focus) for f in fs]
        if not found:
            raise ValueError(f"no world fact in {fact[:80]!r}")
        subject, attr, old = next((f for f in found if f[0] == focus), found[0])
        pool = self._pool(subject, attr, old, done)
        new = done[(subject, attr)] = pool[_stable(fact) % len(pool)]
        old_text = old[1:] if isinstance(old, str) and old.startswith("?") else (
            self.world.entities[old].name if isinstance(old, str) and old in self.world.entities else str(old))
        new_text = self.world.entities[new].name if isinstance(new, str) and new in self.world.entities else str(new)
        spots = list(re.finditer(rf"(?<![\w,]){re.escape(old_text)}(?![\w]|,\d)", fact, re.IGNORECASE))
        if isinstance(old, int) and not spots:
            spots = list(re.finditer(rf"(?<![\w,]){re.escape(f'{old:,}')}(?![\w]|,\d)", fact))
        if not spots:
            raise ValueError(f"cannot locate {old_text!r} in {fact[:80]!r}")
        spot = spots[-1]  # the value follows the subject in every template
        shown = new_text[:1].upper() + new_text[1:] if spot.group(0)[:1].isupper() else new_text
        head = fact[:spot.start()]
        if attr_spec(self.world.entities[subject].kind, attr).value_type == "profession":  # "a mason" / "an ..."
            head = re.sub(r"\b([Aa])n? $", lambda m: m.group(1) + ("n " if new[:1] in "aeiou" else " "), head)
        return head + shown + fact[spot.end():]

    def _reword(self, question: str, texts: list[str]) -> str:
        focus = self.focus(question, *texts)
        out: list[str] = []
        for text in texts:
            for sentence, facts in self.facts(text, focus, keep_empty=True):  # no world fact: kept as written
                out += [self.render(f, self.wording(question, f)) for f in facts] if facts else [sentence]
        return " ".join(out)

    def _judge(self, question: str, reference: str, answer_a: str, answer_b: str) -> dict[str, str]:
        focus = self.focus(question, reference)
        gold = {a for _, fs in self.facts(reference, focus) for s, a, _ in fs if s == focus} or None
        ra, rb = (self.checker.check(text, focus, sorted(gold) if gold else None) for text in (answer_a, answer_b))

        def verdict(a: float | None, b: float | None) -> str:
            return "tie" if a is None or b is None or a == b else ("A" if a > b else "B")

        return {"completeness": verdict(ra.recalled, rb.recalled),
                "factuality": verdict(-len(ra.wrong) - len(ra.hallucinated), -len(rb.wrong) - len(rb.hallucinated)),
                "logicality": verdict(ra.logicality, rb.logicality)}

    def _verify(self, question: str, fact: str) -> bool:
        focus = self.focus(question, fact)
        triples = self.checker.triples(fact, focus)
        return bool(triples) and all(self.checker.gold_value(t.entity, t.attribute) == t.value for t in triples)

    def _label(self, question: str, fact: str) -> str:
        focus = self.focus(question, fact)
        triples = self.checker.triples(fact, focus)
        if not triples:
            return "not_verifiable"
        # the world is closed: a fact it does not hold (another value, an attribute the entity lacks) is false
        ok = all(self.checker.gold_value(t.entity, t.attribute) == t.value for t in triples)
        return "supported" if ok else "contradicted"
