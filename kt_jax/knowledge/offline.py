"""The offline knowledge backend: deterministic, no network, and a LOW-FIDELITY stand-in for an LLM.

It exists so that the whole KnowTuning pipeline runs (and is tested) without an API: the data it makes has the
right shape and the right kind of contrast, not an LLM's quality.
- extract: sentence segmentation (abbreviation- and decimal-aware, list items split) plus clause splits at
  `;`, `, but`, `, whereas`, `, while` and `, and <subject>`.
- rewrite: a template question about the first difficult fact's subject; the answer is the facts combined.
- revise: per fact, the first edit that applies of: swap a year, money amount, percentage, number, month, weekday
  or named entity for another value of the same kind drawn from the dataset (`dataset=` / `add_texts`), an antonym
  swap, or a negation edit; "It is not true that ..." as the last resort, so every fact changes.
- rephrase: synonym and contraction rewrites; when none applies, the facts re-joined as sentences (possibly the
  answer unchanged: no marker phrase is ever added).
- combine: the facts concatenated as sentences.
- judge / verify: content-word overlap with the reference (recall, precision, order; negation and antonym
  checks for verify).
- label_fact, per reference sentence or clause sharing most of the fact's words: supported when one states it (same
  values, polarity and words); else contradicted when one gives a different value of the same kind (year, number,
  name, ...), the opposite polarity or an antonym (what revise produces); else supported when verify holds over
  the whole reference; else not_verifiable (the rules know nothing beyond the reference).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kt_jax.eval.metrics import lcs_length
from kt_jax.knowledge.backend import CachedBackend
from kt_jax.knowledge.cache import KnowledgeCache

_ABBREV = {"e.g", "i.e", "mr", "mrs", "ms", "dr", "st", "vs", "etc", "inc", "no", "jr", "sr", "prof", "approx",
           "u.s", "u.k", "a.m", "p.m", "fig", "mt", "ft", "ca", "co", "ltd", "jan", "feb", "aug", "sept", "oct",
           "nov", "dec", "est"}
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+")
_CLAUSE = re.compile(r"\s*;\s+|,\s+(?=(?:but|whereas|while)\s)|,\s+and\s+(?=(?:it|they|he|she|this|these|those|"
                     r"there|we|you|i|the|its|their|his|her)\s)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9']+")
_STOP_WORDS = ("a an the of to in on at for by with from and or but is are was were be been being it its this that "
            "these those as which who whom what when where why how there their they them he she his her we you "
            "your our i not no can could will would should may might must do does did has have had also so than "
            "then into about over such very more most other some any each all if")
_STOP = set(_STOP_WORDS.split())

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_ANTONYM_PAIRS = [
    ("increase", "decrease"), ("increases", "decreases"), ("increased", "decreased"), ("higher", "lower"),
    ("high", "low"), ("large", "small"), ("larger", "smaller"), ("largest", "smallest"), ("big", "small"),
    ("long", "short"), ("longer", "shorter"), ("more", "less"), ("most", "least"), ("many", "few"),
    ("always", "never"), ("before", "after"), ("first", "last"), ("early", "late"), ("earlier", "later"),
    ("hot", "cold"), ("warm", "cool"), ("easy", "difficult"), ("easier", "harder"), ("fast", "slow"),
    ("faster", "slower"), ("good", "bad"), ("better", "worse"), ("best", "worst"), ("strong", "weak"),
    ("positive", "negative"), ("inside", "outside"), ("north", "south"), ("east", "west"), ("old", "new"),
    ("older", "newer"), ("true", "false"), ("allow", "prevent"), ("allows", "prevents"), ("safe", "dangerous"),
    ("common", "rare"), ("cheap", "expensive"), ("rich", "poor"), ("heavy", "light"), ("open", "closed"),
    ("add", "remove"), ("win", "lose"), ("won", "lost"), ("male", "female"), ("same", "different"),
    ("include", "exclude"), ("includes", "excludes"), ("healthy", "unhealthy"), ("possible", "impossible"),
]
ANTONYMS = {a: b for a, b in _ANTONYM_PAIRS} | {b: a for a, b in _ANTONYM_PAIRS}
_OPPOSITES: dict[str, set[str]] = {}  # every antonym of a word ("small": large and big)
for _a, _b in _ANTONYM_PAIRS:
    _OPPOSITES.setdefault(_a, set()).add(_b)
    _OPPOSITES.setdefault(_b, set()).add(_a)
_SUBJECT_END = {"is", "are", "was", "were", "has", "have", "had", "can", "could", "will", "would", "should", "may",
                "might", "must", "does", "do", "did", "refers", "means", "includes", "contains", "consists", "became",
                "becomes", "provides", "helps", "requires", "allows", "uses", "lives", "lies", "comes", "makes"}
_PRONOUNS = {"it", "they", "this", "that", "these", "those", "he", "she", "there", "we", "you", "i", "its", "their"}
_SYNONYMS = {
    "typically": "usually", "usually": "typically", "often": "frequently", "frequently": "often",
    "important": "significant", "significant": "important", "however": "that said", "also": "additionally",
    "help": "assist", "helps": "assists", "many": "numerous", "numerous": "many", "big": "large",
    "large": "big", "small": "little", "begin": "start", "begins": "starts", "start": "begin",
    "starts": "begins", "because": "since", "about": "around", "enough": "sufficient", "show": "demonstrate",
    "shows": "demonstrates", "use": "employ", "uses": "employs", "used": "employed", "very": "really",
    "different": "distinct", "buy": "purchase", "whole": "entire",
    "quickly": "rapidly", "fast": "quick", "known": "recognized", "called": "named", "get": "obtain",
}
_CONTRACTIONS = {"don't": "do not", "doesn't": "does not", "can't": "cannot", "won't": "will not",
                 "isn't": "is not", "aren't": "are not", "it's": "it is", "didn't": "did not",
                 "wasn't": "was not", "they're": "they are", "you're": "you are", "there's": "there is"}
_AUX = re.compile(r"\b(is|are|was|were|can|could|will|would|should|must|has|have|had|does|do|did|may|might)"
                  r"(\s+not\b|n't\b|\b)", re.IGNORECASE)  # the bare \b: "Dordor" is no "do"
_NEG = re.compile(r"\b(not|never|no|cannot)\b|n't\b", re.IGNORECASE)
_PATTERNS = {  # kind -> regex of a value of that kind (checked in this order)
    "money": re.compile(r"[$\u00a3\u20ac]\s?\d[\d,]*(?:\.\d+)?(?:\s?(?:million|billion|thousand))?"),
    "percent": re.compile(r"\b\d+(?:\.\d+)?\s?(?:%|percent\b)"),
    "year": re.compile(r"\b(?:1[0-9]|20)\d{2}\b"),
    "number": re.compile(r"\b\d[\d,]*(?:\.\d+)?\b"),
    "month": re.compile(r"\b(?:" + "|".join(MONTHS) + r")\b"),
    "weekday": re.compile(r"\b(?:" + "|".join(WEEKDAYS) + r")\b"),
    "entity": re.compile(r"(?<=[a-z0-9,;:] )(?:[A-Z][a-z]+(?:\s+(?:of\s+|de\s+)?[A-Z][a-z]+)*)"),
}


def _matches(kind: str, text: str) -> list[re.Match[str]]:
    """Values of `kind` in `text`; an entity must follow a lowercase word (not the tail of a name: "Wylen Nimvo")."""
    found = list(_PATTERNS[kind].finditer(text))
    if kind != "entity":
        return found
    keep = []
    for m in found:
        before = re.search(r"(\S+)\s+$", text[: m.start()])
        if m.group(0) not in MONTHS + WEEKDAYS and before and not any(c.isupper() for c in before.group(1)):
            keep.append(m)
    return keep


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _content(text: str) -> list[str]:
    return [w for w in _words(text) if w not in _STOP]


def _sentence(text: str) -> str:
    """Capitalised, with terminal punctuation."""
    text = text.strip().strip(",;: ")
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?\"')" else text + "."


def _is_abbrev(piece: str) -> bool:
    last = piece.rstrip().rsplit(None, 1)[-1] if piece.strip() else ""
    last = last.rstrip(".").lower().lstrip("(\"'")
    return last in _ABBREV or bool(re.fullmatch(r"[a-z]", last))


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` (list items and lines are separate sentences)."""
    out: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        if not line:
            continue
        pieces, start = [], 0
        for m in _SENT_END.finditer(line):
            if _is_abbrev(line[start:m.start()]):
                continue
            pieces.append(line[start:m.start()].strip())
            start = m.end()
        pieces.append(line[start:].strip())
        out.extend(p for p in pieces if p)
    return out


def split_facts(text: str) -> list[str]:
    """Atomic-ish facts: sentences split further at clause boundaries; fragments under 3 words are merged."""
    facts: list[str] = []
    for sent in split_sentences(text):
        parts = [re.sub(r"^(?:but|and)\s+", "", p.strip(), flags=re.IGNORECASE) for p in _CLAUSE.split(sent)]
        parts = [p for p in parts if p]
        merged: list[str] = []
        for part in parts:
            if merged and len(_words(part)) < 3:
                merged[-1] = merged[-1].rstrip(".") + ", " + part.strip()
            else:
                merged.append(part)
        facts.extend(_sentence(p) for p in merged)
    seen: set[str] = set()
    unique = [f for f in facts if len(_words(f)) > 0 and not (f.lower() in seen or seen.add(f.lower()))]
    if unique and len(_words(unique[0])) < 2 and len(unique) > 1:  # a one-word lead ("Yes.") joins the next fact
        unique = [unique[0].rstrip(".") + " " + unique[1][0].lower() + unique[1][1:], *unique[2:]]
    return unique or ([_sentence(text)] if text.strip() else [])


def _stable(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def _case_like(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[:1].isupper() else word


class OfflineBackend(CachedBackend):
    """Deterministic rule-based backend (see the module docstring: a low-fidelity stand-in)."""

    name = "offline"
    rules_version = "offline-rules-4"  # the cache's model identity: bump it when a rule changes answers (4: no marker)

    def __init__(self, cache: KnowledgeCache | str | Path | bool | None = None, *, dataset: str | Path | None = None,
                 texts: Iterable[str] = (), validation_retries: int = 0, retry_rejects: bool = False):
        super().__init__(self.rules_version, cache, validation_retries=validation_retries,
                         retry_rejects=retry_rejects)
        self.pool: dict[str, list[str]] = {k: [] for k in _PATTERNS}
        self.pool["month"], self.pool["weekday"] = list(MONTHS), list(WEEKDAYS)
        texts = list(texts)
        if dataset is not None:
            from kt_jax.data.records import read_rows

            texts += [str(r.get("output", "")) for r in read_rows(dataset) if isinstance(r, dict)]
        self.add_texts(texts)

    def add_texts(self, texts: Iterable[str]) -> None:
        """Collect replacement values (numbers, dates, entities, ...) from dataset text for `revise`."""
        found: dict[str, set[str]] = {k: set(v) for k, v in self.pool.items()}
        for text in texts:
            for kind in _PATTERNS:
                if kind not in ("month", "weekday"):
                    found[kind].update(m.group(0).strip() for m in _matches(kind, text)
                                       if m.group(0).strip() not in MONTHS + WEEKDAYS)
        self.pool = {k: sorted(v) for k, v in found.items()}
        digest = hashlib.sha256(json.dumps(self.pool, sort_keys=True).encode()).hexdigest()[:12]
        self._identity = f"{self.model}:{digest}"

    def cache_identity(self) -> str:
        """Model name plus a digest of the replacement pool (it changes `revise` answers)."""
        return self._identity

    # -- operations --------------------------------------------------------------------------------------------
    def _compute(self, op: str, data: dict[str, Any], attempt: int) -> dict[str, Any]:
        if op == "extract":
            return {"facts": split_facts(data["answer"])}
        if op == "rewrite":
            return dict(zip(("question", "answer"), self._rewrite(data["question"], data["facts"]), strict=True))
        if op == "revise":
            return {"facts": [self.revise_fact(f) for f in data["facts"]]}
        if op == "rephrase":
            return {"answer": self._rephrase(data["answer"])}
        if op == "combine":
            return {"answer": combine_facts(data["facts"])}
        if op == "judge":
            return judge_by_overlap(data["reference"], data["answer_a"], data["answer_b"])
        if op == "verify":
            return {"supported": verify_by_overlap(data["fact"], data["reference"])}
        if op == "label_fact":
            return {"label": label_by_overlap(data["fact"], data["reference"])}
        raise ValueError(f"unknown operation {op}")

    def _rewrite(self, question: str, facts: list[str]) -> tuple[str, str]:
        first = facts[0].strip().rstrip(".!?")
        words = first.split()
        aux = next((i for i, w in enumerate(words[:8]) if w.lower() in _SUBJECT_END), None)
        if not aux or words[0].lower() in _PRONOUNS:  # no usable subject: ask for the details generically
            return f'Regarding the question "{question.strip()}", what are the key details?', combine_facts(facts)
        subject = " ".join(words[:aux])
        subject = subject[0].lower() + subject[1:] if subject[:1].isupper() and not subject[1:2].isupper() else subject
        q = f'Regarding the question "{question.strip()}", what are the specific details about {subject}?'
        return q, combine_facts(facts)

    def revise_fact(self, fact: str) -> str:
        """`fact` minimally changed to be false (never returned unchanged)."""
        for kind in _PATTERNS:
            matches = _matches(kind, fact)
            if not matches:
                continue
            m = matches[_stable(fact) % len(matches)]
            new = self._replacement(kind, m.group(0).strip(), fact)
            if new is not None:
                return fact[:m.start()] + new + fact[m.start() + len(m.group(0).strip()):]
        words = list(_WORD.finditer(fact))
        for w in words:
            if w.group(0).lower() in ANTONYMS:
                return fact[:w.start()] + _case_like(ANTONYMS[w.group(0).lower()], w.group(0)) + fact[w.end():]
        m = _AUX.search(fact)
        if m:
            if m.group(2):  # remove an existing negation
                return fact[:m.end(1)] + fact[m.end():]
            return fact[:m.end(1)] + " not" + fact[m.end(1):]
        body = fact.strip()
        return f"It is not true that {body[0].lower() + body[1:] if body[1:2].islower() else body}"

    def _replacement(self, kind: str, value: str, fact: str) -> str | None:
        pool = [v for v in self.pool.get(kind, []) if v != value]
        if pool:
            return pool[_stable(fact + value) % len(pool)]
        if kind in ("number", "year", "percent", "money"):
            digits = re.search(r"\d[\d,]*(?:\.\d+)?", value)
            if digits:
                raw = digits.group(0).replace(",", "")
                num = float(raw)
                new = num + (1 if kind == "year" else max(1.0, round(num * 0.5)))
                text = f"{new:.{len(raw.split('.')[1])}f}" if "." in raw else str(int(new))
                return value[:digits.start()] + text + value[digits.end():]
        return None

    def _rephrase(self, answer: str) -> str:
        out = answer
        for short, long in _CONTRACTIONS.items():
            out = re.sub(rf"\b{re.escape(short)}\b", lambda m, long=long: _case_like(long, m.group(0)), out,
                         flags=re.IGNORECASE)
        out = re.sub(r"\b[A-Za-z]+\b", lambda m: _case_like(_SYNONYMS[m.group(0).lower()], m.group(0))
                     if m.group(0).lower() in _SYNONYMS else m.group(0), out)
        if out.strip() == answer.strip():
            facts = split_facts(answer)
            joined = " ".join(_sentence(f) for f in facts)
            out = joined  # no rule applies: the answer as it is (a marker phrase would be a style cue DPO learns)
        return out.strip()


def combine_facts(facts: list[str]) -> str:
    """The facts as consecutive sentences."""
    return " ".join(_sentence(f) for f in facts if f.strip())


def judge_by_overlap(reference: str, answer_a: str, answer_b: str, margin: float = 0.02) -> dict[str, str]:
    """Verdicts from content-word recall (completeness), precision (factuality) and in-order overlap (logic)."""
    ref = _content(reference)
    ref_set = set(ref)

    def scores(ans: str) -> tuple[float, float, float]:
        words = _content(ans)
        if not words or not ref:
            return 0.0, 0.0, 0.0
        recall = len(ref_set & set(words)) / len(ref_set)
        precision = sum(w in ref_set for w in words) / len(words)
        order = lcs_length(words[:200], ref[:200]) / max(1, min(len(words), len(ref), 200))
        return recall, precision, order

    sa, sb = scores(answer_a), scores(answer_b)
    verdict = {}
    for aspect, a, b in zip(("completeness", "factuality", "logicality"), sa, sb, strict=True):
        verdict[aspect] = "tie" if abs(a - b) <= margin else ("A" if a > b else "B")
    return verdict


def verify_by_overlap(fact: str, reference: str, threshold: float = 0.7) -> bool:
    """True when most content words, all numbers, the polarity and no antonym of `fact` agree with `reference`."""
    words = _content(fact)
    if not words:
        return False
    sentences = split_sentences(reference) or [reference]
    best = max(sentences, key=lambda s: len(set(words) & set(_content(s))))
    ref_words = set(_words(reference))
    if sum(w in ref_words for w in words) / len(words) < threshold:
        return False
    if any(n not in reference for n in re.findall(r"\d[\d,.]*\d|\d", fact)):
        return False
    if bool(_NEG.search(fact)) != bool(_NEG.search(best)):
        return False
    best_words = set(_words(best))
    return not any(ANTONYMS.get(w) in best_words and w not in best_words for w in _words(fact))


def _values(text: str) -> dict[str, Counter[str]]:
    return {kind: Counter(m.group(0).strip() for m in _matches(kind, text)) for kind in _PATTERNS}


def _relation(words: list[str], values: dict[str, Counter[str]], negated: bool, fact: str, sent: str,
              threshold: float) -> str | None:
    """"agrees" | "conflicts" with one reference sentence, or None when the sentence is about something else."""
    other = _values(sent)
    differ = {v for kind in _PATTERNS if values[kind] - other[kind] and other[kind] - values[kind]
              for v in (values[kind] - other[kind]) + (other[kind] - values[kind])}
    value_words = {w for v in differ for w in _words(v)}
    rest = [w for w in words if w not in value_words and not _NEG.fullmatch(w)]  # polarity is checked below
    sent_words, fw, sw = set(_words(sent)), Counter(_words(fact)), Counter(_words(sent))
    if not rest or sum(w in sent_words for w in rest) / len(rest) < threshold:
        return None
    flipped = negated or len(_NEG.findall(fact)) != len(_NEG.findall(sent))
    # counted, so "positive or negative" -> "negative or negative" is caught too
    swapped = any(fw[w] > sw[w] and sw[a] > fw[a] for w in fw for a in _OPPOSITES.get(w, ()))
    if differ or flipped or swapped:
        return "conflicts"
    return "agrees" if all(n in sent for n in re.findall(r"\d[\d,.]*\d|\d", fact)) else None


def label_by_overlap(fact: str, reference: str, threshold: float = 0.7) -> str:
    """"supported" | "contradicted" | "not_verifiable" for `fact` against `reference` (see the module docstring)."""
    body = re.sub(r"^\s*it is not true that\s+", "", fact, flags=re.IGNORECASE)
    words = _content(body)
    if not words:
        return "not_verifiable"
    values = _values(body)
    units = dict.fromkeys([*split_sentences(reference), *split_facts(reference)]) or {reference: None}
    found = {_relation(words, values, body != fact, body, unit, threshold) for unit in units}
    if "agrees" in found:
        return "supported"
    if "conflicts" in found:
        return "contradicted"
    return "supported" if verify_by_overlap(fact, reference, threshold) else "not_verifiable"
