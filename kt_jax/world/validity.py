"""Validity checks of a world run: is the instrument able to show what a run claims, whatever the ranking?

Each check returns {"value", "threshold", "pass"} (plus the numbers it was judged on):
- stored: the base model completes test-entity facts in corpus wording (cloze, greedy) with recall >= 0.9.
  A cloze item is a corpus description of the entity, every sentence in one wording (template variant), cut
  before the probed attribute's value; the completion's first sentence is scored by the checker. Wordings that
  put the value before the entity's name ("In {v}, {e} was born.") cannot be cut there and are skipped.
- learned: SFT test completeness in [0.3, 0.85] (room to move either way) and not below the base model's own
  completeness in the QA template (fine-tuning must not destroy knowledge).
- power: at least 300 test questions and a paired-bootstrap 95% CI half-width of KnowTuning - SFT completeness
  <= 0.03.
- determinism: the same seed on the same machine gives identical numbers (max absolute difference 0).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kt_jax.errors import DataError
from kt_jax.world.checker import Checker
from kt_jax.world.generator import World
from kt_jax.world.render import fact_sentence, value_text
from kt_jax.world.schema import attr_spec

Check = dict[str, Any]  # {"value", "threshold", "pass", ...}
STORED_MIN_RECALL = 0.9
LEARNED_RANGE = (0.3, 0.85)
POWER_MIN_QUESTIONS = 300
POWER_MAX_HALF_WIDTH = 0.03
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s|$)|\n")


@dataclasses.dataclass(frozen=True)
class ClozeItem:
    """One probe: `prompt` (ends just before the value), and the fact it asks for."""

    entity_id: str
    attribute: str
    variant: int
    prompt: str
    sentence_start: str  # the probed sentence's text inside the prompt (scored together with the completion)


def cloze_items(world: World, entity_ids: Sequence[str], variants: Sequence[int] | None = None) -> list[ClozeItem]:
    """Cloze prompts for every fact of `entity_ids` in every corpus wording (or only `variants`) that allows one."""
    items = []
    for eid in entity_ids:
        if eid not in world.entities:
            raise DataError(f"cloze_items: entity {eid!r} is not in the world")
        ent = world.entities[eid]
        title = world.config.title.format(e=ent.display) + "\n" if world.config.title else ""
        facts = [a for a, _ in ent.ordered_facts()]
        for i, attr in enumerate(facts):
            templates = attr_spec(ent.kind, attr).templates
            for v in range(len(templates)) if variants is None else variants:
                t = templates[v % len(templates)]
                if "{e}" not in t or t.index("{e}") > t.index("{v}"):
                    continue
                sentence = fact_sentence(world, ent, attr, v)
                at = _value_at(sentence, value_text(world, ent.facts[attr]), ent.display)
                before = " ".join(fact_sentence(world, ent, a, v) for a in facts[:i])
                start = sentence[:at].rstrip()
                items.append(ClozeItem(eid, attr, v, title + (before + " " if before else "") + start, start))
    return items


def _value_at(sentence: str, value: str, subject: str) -> int:
    """Where the value starts in a sentence (after the subject's name)."""
    named = re.search(re.escape(subject), sentence, re.IGNORECASE)
    return sentence.index(value, named.end() if named else 0)


def score_cloze(world: World, items: Sequence[ClozeItem], completions: Sequence[str]) -> tuple[float, list[dict]]:
    """(recall, rows): an item is recalled when its sentence, completed, states the fact correctly."""
    if len(items) != len(completions):
        raise DataError(f"score_cloze: {len(items)} items but {len(completions)} completions")
    checker = Checker(world)
    rows = []
    for item, completion in zip(items, completions, strict=True):
        if completion and not completion[0].isspace():
            completion = " " + completion
        text = item.sentence_start + completion
        end = _SENTENCE_END.search(text, len(item.sentence_start))
        sentence = text[:end.start()] if end else text
        report = checker.check(sentence, item.entity_id, [item.attribute])
        rows.append({"entity_id": item.entity_id, "attribute": item.attribute, "variant": item.variant,
                     "sentence": sentence, "recalled": report.recalled == 1})
    return (sum(r["recalled"] for r in rows) / len(rows) if rows else float("nan")), rows


def cloze_probe(model: Any, tokenizer: Any, world: World, entity_ids: Sequence[str], *, max_new_tokens: int = 16,
                batch_size: int = 32, variants: Sequence[int] | None = None, mesh: Any = None
                ) -> tuple[float, list[dict]]:
    """Greedy cloze completions of the base model for `entity_ids`' facts (`inference.sampling`), scored."""
    from kt_jax.inference.sampling import SamplingConfig, generate

    items = cloze_items(world, entity_ids, variants)
    completions = generate(model, tokenizer, [it.prompt for it in items], SamplingConfig.greedy(max_new_tokens),
                           mesh=mesh, batch_size=batch_size)
    return score_cloze(world, items, completions)


def check_stored(cloze_recall: float, threshold: float = STORED_MIN_RECALL) -> Check:
    """Pass when the base model's cloze recall of test-entity facts is at least `threshold`."""
    return {"value": cloze_recall, "threshold": threshold, "pass": bool(cloze_recall >= threshold)}


def check_learned(sft_completeness: float, base_qa_completeness: float,
                  bounds: tuple[float, float] = LEARNED_RANGE) -> Check:
    """Pass when SFT's test completeness is within `bounds` and not below the base model's QA completeness."""
    lo, hi = bounds
    ok = lo <= sft_completeness <= hi and sft_completeness >= base_qa_completeness
    return {"value": sft_completeness, "threshold": [lo, hi], "pass": bool(ok),
            "base_qa_completeness": base_qa_completeness}


def check_power(questions: int, difference: Mapping[str, float], *, min_questions: int = POWER_MIN_QUESTIONS,
                max_half_width: float = POWER_MAX_HALF_WIDTH) -> Check:
    """Pass with >= `min_questions` test questions and a CI (of KnowTuning - SFT) half-width <= `max_half_width`."""
    half = (difference["ci_high"] - difference["ci_low"]) / 2
    ok = questions >= min_questions and math.isfinite(half) and half <= max_half_width
    return {"value": half, "threshold": max_half_width, "pass": bool(ok), "questions": questions,
            "min_questions": min_questions}


def _leaves(x: Any, path: str = "") -> dict[str, Any]:
    if isinstance(x, Mapping):
        return {k: v for key in sorted(x, key=str) for k, v in _leaves(x[key], f"{path}/{key}").items()}
    if isinstance(x, list | tuple):
        return {k: v for i, item in enumerate(x) for k, v in _leaves(item, f"{path}[{i}]").items()}
    return {path: x}


def check_determinism(first: Any, second: Any) -> Check:
    """Pass when two runs' numbers (nested dicts/lists) are identical: value = the largest absolute difference."""
    a, b = _leaves(first), _leaves(second)
    worst = 0.0 if a.keys() == b.keys() else math.inf
    for key in a.keys() & b.keys():
        x, y = a[key], b[key]
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, int | float) or not isinstance(
                y, int | float):
            worst = worst if x == y else math.inf
        elif not (x == y or (math.isnan(x) and math.isnan(y))):
            worst = max(worst, abs(x - y) if math.isfinite(x - y) else math.inf)
    return {"value": worst, "threshold": 0.0, "pass": worst == 0.0}
