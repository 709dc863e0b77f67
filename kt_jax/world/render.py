"""World -> text: atomic fact sentences, the pretraining corpus, and alpaca QA splits with their gold questions."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

from kt_jax.world.generator import Entity, World
from kt_jax.world.schema import OVERVIEW_QUESTION, QUESTION_POOL, SCHEMA, attr_spec


@dataclasses.dataclass(frozen=True)
class Question:
    """A QA item's gold: which entity and which attributes (canonical order) the answer should state."""

    instruction: str
    entity_id: str
    attributes: tuple[str, ...]
    kind: str  # "overview" | "narrow"


def value_text(world: World, value: Any) -> str:
    """How a fact value reads inside a sentence (entity ids become display names)."""
    if isinstance(value, str) and value in world.entities:
        return world.entities[value].display
    return str(value)


def _capitalise(sentence: str) -> str:
    sentence = re.sub(r"\ba ([aeiou])", r"an \1", sentence)
    return sentence[:1].upper() + sentence[1:]


def fact_sentence(world: World, ent: Entity, attr: str, variant: int = 0) -> str:
    """One atomic sentence stating `ent`'s attribute `attr` (variant 0 = the canonical wording)."""
    spec = attr_spec(ent.kind, attr)
    template = spec.templates[variant % len(spec.templates)]
    return _capitalise(template.format(e=ent.display, v=value_text(world, ent.facts[attr])))


def canonical_answer(world: World, ent: Entity, attributes: tuple[str, ...] | None = None) -> str:
    """The reference answer: one canonical sentence per fact, in canonical order."""
    names = [a for a, _ in ent.ordered_facts() if attributes is None or a in attributes]
    return " ".join(fact_sentence(world, ent, a, 0) for a in names)


def description(world: World, ent: Entity, rng: random.Random) -> str:
    """A corpus description: every fact once, each sentence in a random wording; canonical order, or a random
    order when the world permutes descriptions."""
    attrs = [a for a, _ in ent.ordered_facts()]
    if world.config.permute_descriptions:
        rng.shuffle(attrs)
    return " ".join(fact_sentence(world, ent, a, rng.randrange(len(attr_spec(ent.kind, a).templates)))
                    for a in attrs)


def questions_for(world: World, ent: Entity, rng: random.Random, narrow_count: int | None = None) -> list[Question]:
    """The overview question plus `narrow_count` (default: `narrow_questions`) narrow ones from the kind's pool
    whose attributes the entity has (all of them when the pool is smaller)."""
    out = [Question(OVERVIEW_QUESTION.format(e=ent.display), ent.id, tuple(a for a, _ in ent.ordered_facts()),
                    "overview")]
    count = world.config.narrow_questions if narrow_count is None else narrow_count
    narrow = [(q, attrs) for q, attrs in QUESTION_POOL[ent.kind] if all(a in ent.facts for a in attrs)]
    for q, attrs in rng.sample(narrow, min(count, len(narrow))):
        order = tuple(s.name for s in SCHEMA[ent.kind] if s.name in attrs)
        out.append(Question(_capitalise(q.format(e=ent.display)), ent.id, order, "narrow"))
    return out


def record(world: World, q: Question) -> dict[str, str]:
    """The alpaca record of a question: instruction, empty input, canonical answer."""
    return {"instruction": q.instruction, "input": "",
            "output": canonical_answer(world, world.entities[q.entity_id], q.attributes)}


SPLITS = ("train", "valid", "test")


def splits(world: World) -> dict[str, list[Question]]:
    """Questions per entity group: train, test, valid (fine-tuning splits) and qa (pretraining only); deterministic.

    Drawn in the order train, test, valid, qa; validation and test entities get `heldout_narrow_questions` each.
    """
    rng = random.Random(world.config.seed + 1)
    held = world.config.heldout_narrow_questions
    groups = (("train", world.train_ids, None), ("test", world.test_ids, held), ("valid", world.valid_ids, held),
              ("qa", world.qa_ids, None))
    return {name: [q for eid in ids for q in questions_for(world, world.entities[eid], rng, count)]
            for name, ids, count in groups}


def corpus(world: World, questions: dict[str, list[Question]] | None = None) -> list[str]:
    """Pretraining documents: every entity described `descriptions_per_entity` times, the QA pairs of the qa group
    (mixed training) and, with `corpus_qa`, the train split's QA pairs; shuffled."""
    from kt_jax.data.templates import alpaca_prompt

    rng = random.Random(world.config.seed + 2)
    qs = questions if questions is not None else splits(world)
    title = lambda ent: world.config.title.format(e=ent.display) + "\n" if world.config.title else ""
    docs = [title(ent) + description(world, ent, rng) for ent in world.entities.values()
            for _ in range(world.config.descriptions_per_entity)]
    qa = qs["qa"] + (qs["train"] if world.config.corpus_qa else [])
    docs += [alpaca_prompt(q.instruction) + record(world, q)["output"] for q in qa]
    rng.shuffle(docs)
    return docs


def write_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write world.json, corpus.jsonl, qa_{train,valid,test}.json and questions.jsonl (gold per question).

    qa_valid.json is written (possibly empty) whatever the world's valid_fraction, so every world has the same files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qs = splits(world)
    paths = {"world": world.save(out / "world.json"), "corpus": out / "corpus.jsonl",
             **{split: out / f"qa_{split}.json" for split in SPLITS}, "questions": out / "questions.jsonl"}
    with open(paths["corpus"], "w", encoding="utf-8") as fh:
        for doc in corpus(world, qs):
            fh.write(json.dumps({"text": doc}) + "\n")
    for split in SPLITS:
        rows = [record(world, q) for q in qs[split]]
        paths[split].write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    with open(paths["questions"], "w", encoding="utf-8") as fh:
        for split, items in qs.items():
            for q in items:
                fh.write(json.dumps({"split": split, **dataclasses.asdict(q)}) + "\n")
    return paths


def load_questions(path: str | Path) -> dict[str, Question]:
    """instruction -> Question, from a questions.jsonl written by `write_world`."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            out[row["instruction"]] = Question(row["instruction"], row["entity_id"], tuple(row["attributes"]),
                                               row["kind"])
    return out
