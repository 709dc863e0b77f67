"""World generation: deterministic per seed, disjoint splits, consistent facts, text the checker reads back exactly."""

from __future__ import annotations

import collections
import dataclasses
import json
import random

import pytest

from kt_jax.errors import ConfigError
from kt_jax.world import Checker, WorldConfig, corpus, generate_world, splits, write_world
from kt_jax.world.generator import ARTEFACT_NOUNS, ORG_SUFFIXES, REGION_SUFFIXES, World
from kt_jax.world.render import description, load_questions, record
from kt_jax.world.schema import SCHEMA


def test_deterministic_per_seed():
    cfg = WorldConfig(seed=3)
    a, b = generate_world(cfg), generate_world(cfg)
    assert a.to_json() == b.to_json()
    assert corpus(a) == corpus(b)
    assert [record(a, q) for q in splits(a)["test"]] == [record(b, q) for q in splits(b)["test"]]
    assert generate_world(WorldConfig(seed=4)).to_json() != a.to_json()


def test_splits_disjoint_and_test_entities_in_corpus():
    world = generate_world(WorldConfig(seed=0))
    assert set(world.train_ids).isdisjoint(world.test_ids)
    assert sorted(world.train_ids + world.test_ids) == sorted(world.entities)
    qs = splits(world)
    train_ents = {q.entity_id for q in qs["train"]}
    test_ents = {q.entity_id for q in qs["test"]}
    assert train_ents.isdisjoint(test_ents) and test_ents == set(world.test_ids)
    docs = corpus(world)
    for eid in world.test_ids:  # the base model must be able to learn the test entities
        ent = world.entities[eid]
        assert sum(ent.display in d for d in docs) >= world.config.descriptions_per_entity
    test_questions = {q.instruction for q in qs["test"]}
    assert not any(q in d for d in docs for q in test_questions)  # no test QA pair leaks into the corpus


def test_schema_attribute_counts_and_consistency():
    world = generate_world(WorldConfig(seed=1, num_people=30, num_artefacts=20))
    for ent in world.entities.values():
        assert 5 <= len(ent.facts) <= 8, ent
        assert set(ent.facts) <= {s.name for s in SCHEMA[ent.kind]}
        assert all(s.name in ent.facts for s in SCHEMA[ent.kind] if not s.optional)
        if ent.kind == "person":
            assert ent.facts["birth_year"] < ent.facts["death_year"]
        if ent.kind == "artefact":
            maker = world.entities[ent.facts["maker"]]
            assert maker.facts["creation"] == ent.id
            assert maker.facts["birth_year"] < ent.facts["made_year"] <= maker.facts["death_year"]
    names = [e.name for e in world.entities.values()] + world.regions + world.rivers
    fixed = {w for part in (*ORG_SUFFIXES, *ARTEFACT_NOUNS, *REGION_SUFFIXES) for w in part.split()}
    words = [w for n in names for w in n.split() if w not in fixed]
    assert len(set(words)) == len(words)  # every syllable word names one thing only


def test_checker_reads_every_generated_text_exactly():
    world = generate_world(WorldConfig(seed=2))
    checker = Checker(world)
    for qs in splits(world).values():
        for q in qs:
            r = checker.check(record(world, q)["output"], q.entity_id, q.attributes)
            assert (r.completeness, r.factuality, len(r.hallucinated)) == (1.0, 1.0, 0), q
            assert r.logicality in (None, 1.0)
    rng = random.Random(0)
    for ent in world.entities.values():
        for _ in range(8):
            r = checker.check(description(world, ent, rng), ent.id)
            assert (r.completeness, r.factuality, r.logicality) == (1.0, 1.0, 1.0), ent.id


def test_write_world_roundtrip(tmp_path):
    world = generate_world(WorldConfig(seed=5, num_people=8, num_orgs=4, num_places=4, num_artefacts=4))
    paths = write_world(world, tmp_path)
    again = World.load(paths["world"])
    assert again.to_json() == world.to_json()
    rows = json.loads(paths["test"].read_text())
    assert rows and all(set(r) == {"instruction", "input", "output"} for r in rows)
    questions = load_questions(paths["questions"])
    assert all(r["instruction"] in questions for r in rows)
    lines = paths["corpus"].read_text().splitlines()
    assert len(lines) == len(corpus(world))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_artefacts"):
        WorldConfig(num_people=4, num_artefacts=5)
    with pytest.raises(ConfigError, match="test_fraction"):
        WorldConfig(test_fraction=1.0)


def test_entity_groups_and_a_corpus_without_fine_tuning_qa():
    cfg = WorldConfig(seed=6, num_people=30, num_orgs=10, num_places=10, num_artefacts=12, valid_fraction=0.2,
                      qa_fraction=0.3, corpus_qa=False, narrow_questions=3)
    world = generate_world(cfg)
    groups = [world.train_ids, world.valid_ids, world.test_ids, world.qa_ids]
    ids = [e for group in groups for e in group]
    assert sorted(ids) == sorted(world.entities) and all(groups)
    assert len(set(ids)) == len(world.entities)  # disjoint
    assert len([e for e in world.qa_ids if e.startswith("person")]) == round(30 * 0.3)
    qs = splits(world)
    docs = corpus(world, qs)
    for eid, ent in world.entities.items():  # every entity, whatever its group, is described
        assert sum(d.startswith(f"About {ent.display}\n") for d in docs) == cfg.descriptions_per_entity, eid
    in_corpus = {q.instruction for q in qs["qa"]}
    assert all(any(q in d for d in docs) for q in in_corpus)  # mixed training: the qa group's QA pairs
    for split in ("train", "valid", "test"):  # ... and no QA text about any fine-tuning entity
        assert not any(q.instruction in d for q in qs[split] for d in docs), split
    assert sum("### Response:" in d for d in docs) == len(qs["qa"])
    # the old leaky regime adds the train split's QA pairs; carving out a validation group keeps the test entities
    leaky = generate_world(WorldConfig(seed=6, corpus_qa=True))
    assert sum("### Response:" in d for d in corpus(leaky)) == len(splits(leaky)["train"])
    grouped = generate_world(dataclasses.replace(leaky.config, valid_fraction=0.2))
    assert grouped.test_ids == leaky.test_ids and set(grouped.valid_ids) < set(leaky.train_ids)
    with pytest.raises(ConfigError, match="leave entities for training"):
        WorldConfig(test_fraction=0.5, valid_fraction=0.2, qa_fraction=0.3)


def test_permuted_descriptions_state_the_same_facts_in_other_orders():
    world = generate_world(WorldConfig(seed=7, permute_descriptions=True))
    checker, rng = Checker(world), random.Random(0)
    orders = set()
    for ent in world.entities.values():
        for _ in range(4):
            text = description(world, ent, rng)
            r = checker.check(text, ent.id)
            assert (r.completeness, r.factuality) == (1.0, 1.0), text
            orders.add((ent.id, tuple(t.attribute for t in checker.triples(text, ent.id))))
    assert len(orders) > len(world.entities)  # the same entity is described in more than one order


def test_held_out_entities_get_more_narrow_questions_from_the_pool():
    from kt_jax.world.schema import NARROW_QUESTIONS, QUESTION_POOL

    base = dict(seed=3, num_people=20, num_orgs=8, num_places=8, num_artefacts=10, valid_fraction=0.2,
                narrow_questions=2)
    world = generate_world(WorldConfig(**base, heldout_narrow_questions=16))
    qs = splits(world)
    per_entity = {split: collections.Counter(q.entity_id for q in qs[split]) for split in ("train", "valid", "test")}
    assert set(per_entity["train"].values()) == {3}  # overview + narrow_questions
    for split in ("valid", "test"):  # overview + every pool question the entity has the attributes for
        for eid, n in per_entity[split].items():
            ent = world.entities[eid]
            eligible = [a for _, a in QUESTION_POOL[ent.kind] if all(x in ent.facts for x in a)]
            assert n == 1 + min(16, len(eligible)), (split, eid)
    # every question asks for attributes the entity has, and the pool keeps the backend's rewrite questions
    for q in [q for split in qs.values() for q in split]:
        assert all(a in world.entities[q.entity_id].facts for a in q.attributes)
    assert all(set(NARROW_QUESTIONS[k]) <= set(QUESTION_POOL[k]) for k in NARROW_QUESTIONS)
    # the default keeps held-out entities at narrow_questions
    plain = splits(generate_world(WorldConfig(**base)))
    assert set(collections.Counter(q.entity_id for q in plain["test"]).values()) <= {3}
    with pytest.raises(ConfigError, match="heldout_narrow_questions"):
        WorldConfig(heldout_narrow_questions=99)
