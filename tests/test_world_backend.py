"""The `world` knowledge backend on hand-checked sentences of a small world (generator output, seed 0, frozen here
so that a change of the generator does not silently change what these tests check)."""

from __future__ import annotations

import pytest

from kt_jax.errors import ConfigError
from kt_jax.knowledge import make_backend
from kt_jax.knowledge.backend import Rejected
from kt_jax.knowledge.compare import build_kc
from kt_jax.knowledge.world_backend import WorldBackend
from kt_jax.world import Checker, Entity, World, WorldConfig, canonical_answer
from kt_jax.world.schema import SCHEMA


def _world() -> World:
    ents = [
        Entity("person0", "person", "Rony Yarwyny", "", {
            "birth_year": 1672, "birthplace": "place1", "profession": "shipwright", "employer": "org1",
            "creation": "artefact0", "residence": "place2", "death_year": 1760}),
        Entity("person1", "person", "Pollen Quabomo", "", {
            "birth_year": 1754, "birthplace": "place0", "school": "org1", "profession": "astronomer",
            "employer": "org0", "creation": "artefact1", "death_year": 1813}),
        Entity("person2", "person", "Boqua Eshfami", "", {
            "birth_year": 1690, "birthplace": "place0", "profession": "potter", "employer": "org0",
            "death_year": 1750}),
        Entity("org0", "org", "Sathu Academy", "the", {
            "founded_year": 1738, "founder": "person2", "seat": "place0", "sector": "lace", "members": 420}),
        Entity("org1", "org", "Rindor Company", "the", {
            "founded_year": 1725, "founder": "person0", "seat": "place1", "sector": "wool", "members": 130,
            "rival": "org0"}),
        Entity("place0", "place", "Thunim", "", {
            "founded_year": 1523, "region": "Tolmir Marches", "river": "Quaom", "famous_for": "rope",
            "population": 74500}),
        Entity("place1", "place", "Dratol", "", {
            "founded_year": 1213, "region": "Ticor Valley", "river": "Quaom", "famous_for": "dyes",
            "population": 11800}),
        Entity("place2", "place", "Wyrabo", "", {
            "founded_year": 1577, "region": "Tolmir Marches", "river": "Tolol", "famous_for": "tea",
            "population": 58900}),
        Entity("artefact0", "artefact", "Sawy Astrolabe", "the", {
            "made_year": 1701, "maker": "person0", "material": "jade", "weight": 855, "kept_at": "place0"}),
        Entity("artefact1", "artefact", "Yaran Tapestry", "the", {
            "made_year": 1802, "maker": "person1", "material": "silver", "weight": 746, "kept_at": "place0"}),
    ]
    return World(WorldConfig(), {e.id: e for e in ents}, ["Ticor Valley", "Tolmir Marches"], ["Quaom", "Tolol"],
                 [], [])


@pytest.fixture(scope="module")
def world_path(tmp_path_factory):
    return _world().save(tmp_path_factory.mktemp("world") / "world.json")


@pytest.fixture(scope="module")
def backend(world_path) -> WorldBackend:
    return make_backend("world", world=str(world_path), cache="none")


@pytest.fixture(scope="module")
def world(world_path) -> World:
    return World.load(world_path)


Q0 = "Tell me about Rony Yarwyny."
RONY = ("In 1672, Rony Yarwyny was born. Rony Yarwyny was born in Dratol. Rony Yarwyny was a shipwright. "
        "Rony Yarwyny worked for the Rindor Company. Rony Yarwyny made the Sawy Astrolabe. "
        "Rony Yarwyny later moved to Wyrabo. Rony Yarwyny died in 1760.")


def test_extract_one_fact_per_attribute_sentence(backend, world):
    assert canonical_answer(world, world.entities["person0"]) == RONY
    assert backend.extract(Q0, RONY) == RONY.replace(". ", ".|").split("|")
    # pronouns resolved, a two-fact sentence split, a claim outside the world's schema kept as written
    text = "Rony Yarwyny was born in 1672 in Dratol. He was a shipwright. He had a long life."
    assert backend.extract(Q0, text) == ["In 1672, Rony Yarwyny was born.", "Rony Yarwyny was born in Dratol.",
                                         "Rony Yarwyny was a shipwright.", "He had a long life."]
    assert backend.extract(Q0, "Nothing is known.") == ["Nothing is known."]
    with pytest.raises(Rejected, match="no world entity"):
        backend.extract("What is this?", "Nothing is known.")


def test_rewrite_asks_the_schema_narrow_question(backend):
    # birthplace alone: "When and where ... born?" asks for the birth year too, answered from the world
    assert backend.rewrite(Q0, ["Rony Yarwyny was born in Dratol."]) == (
        "When and where was Rony Yarwyny born?", "In 1672, Rony Yarwyny was born. Rony Yarwyny was born in Dratol.")
    assert backend.rewrite(Q0, ["Rony Yarwyny died in 1760."]) == ("When did Rony Yarwyny die?",
                                                                   "Rony Yarwyny died in 1760.")
    # two difficult facts from two questions; residence has no narrow question (schema label instead)
    q, a = backend.rewrite(Q0, ["Rony Yarwyny later moved to Wyrabo.", "Rony Yarwyny was a shipwright."])
    assert q == "What was the working life of Rony Yarwyny? What is the residence of Rony Yarwyny?"
    assert a == ("Rony Yarwyny was a shipwright. Rony Yarwyny worked for the Rindor Company. "
                 "Rony Yarwyny later moved to Wyrabo.")
    q, a = backend.rewrite("Tell me about the Sathu Academy.", ["The Sathu Academy has 420 members."])
    assert (q, a) == ("How many members does the Sathu Academy have?", "The Sathu Academy has 420 members.")


def test_revise_swaps_in_another_world_value(backend, world):
    facts = backend.extract(Q0, RONY)
    revised = backend.revise(Q0, facts)
    checker = Checker(world)
    for fact, new in zip(facts, revised, strict=True):
        assert new != fact and " not " not in new
        (old_t,), (new_t,) = checker.triples(fact, "person0"), checker.triples(new, "person0")
        assert (new_t.entity, new_t.attribute) == (old_t.entity, old_t.attribute)
        assert new_t.value != old_t.value
        report = checker.check(new, "person0")
        assert len(report.wrong) == 1 and not report.hallucinated  # false, and about a value the world has
    # hand-checked: places, orgs and artefacts come from the world; the year is another person's birth year
    assert revised[1] in ("Rony Yarwyny was born in Thunim.", "Rony Yarwyny was born in Wyrabo.")
    assert revised[3] == "Rony Yarwyny worked for the Sathu Academy."  # the only other org
    assert revised[4] == "Rony Yarwyny made the Yaran Tapestry."  # the only other artefact
    assert revised[0] in ("In 1754, Rony Yarwyny was born.", "In 1690, Rony Yarwyny was born.")
    # "a shipwright" -> "a potter" / "an astronomer": the article follows the new word
    assert revised[2] in ("Rony Yarwyny was a potter.", "Rony Yarwyny was an astronomer.")
    assert backend.revise("Tell me about Pollen Quabomo.", ["Pollen Quabomo was an astronomer."]) in (
        ["Pollen Quabomo was a shipwright."], ["Pollen Quabomo was a potter."])
    assert backend.revise("Tell me about Thunim.", ["Thunim lies on the river Quaom."]) == [
        "Thunim lies on the river Tolol."]


def test_rephrase_rewords_every_fact_without_marker(backend, world):
    out = backend.rephrase(Q0, RONY)
    assert "In short" not in out and out != RONY
    checker = Checker(world)
    report = checker.check(out, "person0")
    assert report.completeness == 1.0 and report.factuality == 1.0 and report.logicality == 1.0
    canonical = set(RONY.replace(". ", ".|").split("|"))
    assert canonical == {backend.render(("person0", a, v), 0) for a, v in world.entities["person0"].facts.items()}
    sentences = out.replace(". ", ".|").split("|")
    assert len(sentences) == 7 and not canonical & set(sentences)  # every fact in an alternative wording
    assert all(any(s in (backend.render(("person0", a.name, world.entities["person0"].facts[a.name]), i)
                         for i in range(1, len(a.templates))) for a in SCHEMA["person"]
                   if a.name in world.entities["person0"].facts) for s in sentences)
    assert backend.rephrase(Q0, "He was a shipwright. He had a long life.") == (
        f"{backend.render(('person0', 'profession', 'shipwright'), backend.wording(Q0, ('person0', 'profession', 0)))}"
        " He had a long life.")
    # combine words each fact as rephrase does, so a KC pair differs in content, not in wording
    assert backend.combine(Q0, backend.extract(Q0, RONY)) == out


def test_kc_pairs_differ_in_content_only(backend):
    rows = [{"id": 0, "question": Q0, "input": "", "answer": RONY, "facts": backend.extract(Q0, RONY)}]
    records, rejects, _ = build_kc(backend, rows, combine="llm", workers=1)
    assert not rejects and {r.aspect for r in records} == {"completeness", "factuality", "logicality"}
    for r in records:
        chosen, rejected = set(r.chosen.replace(". ", ".|").split("|")), set(r.rejected.replace(". ", ".|").split("|"))
        if r.aspect == "completeness":
            assert rejected < chosen
        elif r.aspect == "logicality":
            assert rejected == chosen and r.rejected != r.chosen
        else:
            assert len(chosen - rejected) == 7 and "In short" not in r.chosen


def test_judge_is_exact(backend):
    full = RONY
    partial = "Rony Yarwyny was born in Dratol. Rony Yarwyny died in 1760."
    wrong = "Rony Yarwyny was born in Thunim. Rony Yarwyny died in 1760."
    reversed_ = "Rony Yarwyny died in 1760. Rony Yarwyny was born in Dratol."
    assert backend.judge(Q0, full, partial, full) == {"completeness": "B", "factuality": "tie", "logicality": "tie"}
    assert backend.judge(Q0, full, partial, wrong) == {"completeness": "A", "factuality": "A", "logicality": "tie"}
    assert backend.judge(Q0, full, reversed_, partial) == {"completeness": "tie", "factuality": "tie",
                                                           "logicality": "B"}
    # the reference fixes the gold: a narrow reference counts only its facts
    narrow = "Rony Yarwyny died in 1760."
    assert backend.judge("When did Rony Yarwyny die?", narrow, partial, full)["completeness"] == "tie"


def test_verify_is_exact(backend):
    assert backend.verify(Q0, "Rony Yarwyny was a shipwright.", RONY)
    assert backend.verify(Q0, "He later moved to Wyrabo.", RONY)
    assert not backend.verify(Q0, "Rony Yarwyny was a potter.", RONY)
    assert not backend.verify(Q0, "Rony Yarwyny was born in Zorbia.", RONY)  # a name the world does not have
    assert not backend.verify(Q0, "Rony Yarwyny was not a potter.", RONY)  # a negation states nothing
    assert not backend.verify(Q0, "He had a long life.", RONY)
    narrow = "Rony Yarwyny died in 1760."  # the reference omits the profession: the world still settles it
    assert [backend.label_fact(Q0, f, narrow) for f in ("Rony Yarwyny was a shipwright.", "He was a potter.",
                                                         "Rony Yarwyny studied at the Sathu Academy.",
                                                         "He had a long life.")] == [
        "supported", "contradicted", "contradicted", "not_verifiable"]


def test_options_and_cache_identity(world_path, tmp_path):
    with pytest.raises(ConfigError, match="world"):
        make_backend("world")
    other = _world()
    other.entities["person0"].facts["death_year"] = 1761
    a = make_backend("world", world=str(world_path))
    b = make_backend("world", world=str(other.save(tmp_path / "w.json")))
    assert a.cache_identity() != b.cache_identity() and a.cache_identity().startswith("world-rules-")
    cached = make_backend("world", world=str(world_path), cache=str(tmp_path / "c.sqlite3"))
    first = cached.revise(Q0, ["Rony Yarwyny was a shipwright."])
    assert cached.revise(Q0, ["Rony Yarwyny was a shipwright."]) == first and cached.stats.get("cache_hits") == 1


def test_every_operation_is_valid_on_a_generated_world(tmp_path):
    from kt_jax.data.records import QARecord
    from kt_jax.knowledge.augment import attach_perplexities, build_ka, extract_facts, lexical_scorer
    from kt_jax.world import generate_world, splits
    from kt_jax.world.render import record

    world = generate_world(WorldConfig(seed=0))
    backend = make_backend("world", world=str(world.save(tmp_path / "world.json")))
    qs = splits(world)["train"]
    recs = [QARecord(r["instruction"], r["output"]) for r in (record(world, q) for q in qs)]
    rows = extract_facts(backend, recs, workers=1)
    assert not [r for r in rows if "error" in r]
    assert [len(r["facts"]) for r in rows] == [len(q.attributes) for q in qs]  # one fact per gold attribute
    ka, rejects = build_ka(backend, attach_perplexities(rows, lexical_scorer([r.answer for r in recs])), workers=1)
    assert not rejects and len(ka) == 2 * len(recs)
    checker = Checker(world)
    for q, rewritten in zip(qs, [r for r in ka if r.provenance == "rewritten"], strict=True):
        report = checker.check(rewritten.answer, q.entity_id)
        assert report.factuality == 1.0 and world.entities[q.entity_id].display in rewritten.question
    kc, rejects, _ = build_kc(backend, rows, combine="llm", workers=1)
    assert not rejects
    for r, q in ((r, next(q for q in qs if q.instruction == r.question)) for r in kc if r.aspect == "factuality"):
        chosen, rejected = (checker.check(t, q.entity_id, q.attributes) for t in (r.chosen, r.rejected))
        assert chosen.factuality == 1.0 and chosen.completeness == 1.0
        assert not rejected.correct and not rejected.hallucinated and len(rejected.wrong) == len(q.attributes)
        years = {t.attribute: t.value for t in rejected.wrong if isinstance(t.value, int)}
        for first, then in (("birth_year", "death_year"), ("founded_year", "dissolved_year"),
                            ("made_year", "stolen_year")):
            if first in years and then in years:  # revised dates stay in order: plausible, not absurd
                assert years[first] < years[then], r.rejected
