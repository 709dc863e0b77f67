"""The world checker on hand-written texts whose counts were worked out by hand (see each test's comment)."""

from __future__ import annotations

import pytest

from kt_jax.world import Checker, Entity, World, WorldConfig, kendall_tau, summarize


@pytest.fixture(scope="module")
def world() -> World:
    ents = [
        Entity("person0", "person", "Dorvak Milen", "", {
            "birth_year": 1843, "birthplace": "place0", "profession": "cartographer", "employer": "org0",
            "creation": "artefact0", "death_year": 1901}),
        Entity("person1", "person", "Ilsa Brenow", "", {
            "birth_year": 1801, "birthplace": "place1", "profession": "weaver", "employer": "org0",
            "death_year": 1870}),
        Entity("org0", "org", "Velmar Guild", "the", {
            "founded_year": 1820, "founder": "person1", "seat": "place0", "sector": "salt", "members": 340}),
        Entity("place0", "place", "Tasmora", "", {
            "founded_year": 1402, "region": "Kesh Valley", "river": "Ostra", "famous_for": "wool",
            "population": 12400}),
        Entity("place1", "place", "Kelvoth", "", {
            "founded_year": 1350, "region": "Kesh Valley", "river": "Ostra", "famous_for": "honey",
            "population": 4300, "twin": "place0"}),
        Entity("artefact0", "artefact", "Orrin Lantern", "the", {
            "made_year": 1880, "maker": "person0", "material": "bronze", "weight": 12, "kept_at": "place1"}),
    ]
    return World(WorldConfig(), {e.id: e for e in ents}, ["Kesh Valley"], ["Ostra"], [], [])


def triples(report):
    return {(t.entity, t.attribute, t.value) for t in report.stated}


def test_perfect_canonical_answer(world):
    text = ("Dorvak Milen was born in 1843. Dorvak Milen was born in Tasmora. Dorvak Milen was a cartographer. "
            "Dorvak Milen worked for the Velmar Guild. Dorvak Milen made the Orrin Lantern. Dorvak Milen died in 1901.")
    r = Checker(world).check(text, "person0")
    assert (len(r.stated), len(r.correct), r.recalled) == (6, 6, 6)
    assert (r.completeness, r.factuality, r.logicality) == (1.0, 1.0, 1.0)
    assert not r.wrong and not r.hallucinated


def test_wrong_values_and_missing_facts(world):
    # stated: birth_year 1844 (wrong), birthplace Tasmora (right), profession weaver (wrong), death 1901 (right);
    # missing: employer, creation. completeness 2/6, factuality 2/4, order ranks [0,1,3,7] -> tau 1.
    text = ("Dorvak Milen was born in 1844. Dorvak Milen was born in Tasmora. Dorvak Milen was a weaver. "
            "Dorvak Milen died in 1901.")
    r = Checker(world).check(text, "person0")
    assert triples(r) == {("person0", "birth_year", 1844), ("person0", "birthplace", "place0"),
                          ("person0", "profession", "weaver"), ("person0", "death_year", 1901)}
    assert {(t.attribute, t.value) for t in r.wrong} == {("birth_year", 1844), ("profession", "weaver")}
    assert r.recalled == 2 and r.completeness == pytest.approx(2 / 6)
    assert r.factuality == pytest.approx(0.5) and r.logicality == 1.0 and not r.hallucinated


def test_reordered_reworded_with_pronouns(world):
    # order: death(7), profession(3), birth_year(0), employer(4): concordant pairs (3,4),(0,4) = 2, discordant 4
    # -> tau = (2 - 4) / 6 = -1/3; all four correct -> completeness 4/6, factuality 1.
    text = ("Dorvak Milen died in 1901. He was a cartographer. In 1843, Dorvak Milen was born. "
            "He was employed by the Velmar Guild.")
    r = Checker(world).check(text, "person0")
    assert [(t.attribute, t.value) for t in r.stated] == [
        ("death_year", 1901), ("profession", "cartographer"), ("birth_year", 1843), ("employer", "org0")]
    assert r.completeness == pytest.approx(4 / 6) and r.factuality == 1.0
    assert r.logicality == pytest.approx(-1 / 3)


def test_hallucinated_attributes_and_unknown_names(world):
    # birth_year right; school and residence do not exist for Dorvak -> hallucinated; "Zorbia" is no place of the
    # world -> a stated birthplace with a wrong value. stated 4, correct 1, wrong 1, hallucinated 2.
    text = ("Dorvak Milen was born in 1843. Dorvak Milen studied at the Velmar Guild. Dorvak Milen settled in Kelvoth. "
            "Dorvak Milen was born in Zorbia.")
    r = Checker(world).check(text, "person0")
    assert {(t.attribute, t.value) for t in r.hallucinated} == {("school", "org0"), ("residence", "place1")}
    assert [(t.attribute, t.value) for t in r.wrong] == [("birthplace", "?Zorbia")]
    assert r.completeness == pytest.approx(1 / 6) and r.factuality == pytest.approx(0.25)
    assert r.logicality == 1.0  # only existing attributes are ranked: birth_year(0), birthplace(1)


def test_inverse_relations_and_other_entities(world):
    # (artefact0, maker, person0) right and recalls Dorvak's creation; "Ilsa Brenow founded the Velmar Guild" is
    # (org0, founder, person1), right; founded 1825 wrong (1820); population 12,400 right. 3/4 correct.
    text = ("The Orrin Lantern was made by Dorvak Milen. Ilsa Brenow founded the Velmar Guild. "
            "The Velmar Guild was founded in 1825. Tasmora has a population of 12,400.")
    r = Checker(world).check(text, "person0")
    assert triples(r) == {("artefact0", "maker", "person0"), ("org0", "founder", "person1"),
                          ("org0", "founded_year", 1825), ("place0", "population", 12400)}
    assert len(r.correct) == 3 and len(r.wrong) == 1 and r.recalled == 1 and r.off_target == 3
    assert r.factuality == pytest.approx(0.75) and r.logicality is None


def test_narrow_question_and_two_facts_in_one_sentence(world):
    # born 1843 (right) in Kelvoth (wrong: Tasmora); died 1901 is right but not asked for.
    text = "Dorvak Milen was born in 1843 in Kelvoth and died in 1901."
    r = Checker(world).check(text, "person0", ["birth_year", "birthplace"])
    assert triples(r) == {("person0", "birth_year", 1843), ("person0", "birthplace", "place1"),
                          ("person0", "death_year", 1901)}
    assert r.recalled == 1 and r.completeness == 0.5 and r.factuality == pytest.approx(2 / 3)
    assert r.logicality == 1.0


def test_place_and_artefact_wordings(world):
    # twin, river (river before subject), region, famous_for: all right; weight 13 wrong, kept_at right.
    c = Checker(world)
    r = c.check("Kelvoth is twinned with Tasmora. The river Ostra flows through Kelvoth. It lies in the Kesh Valley. "
                "Kelvoth is famous for its honey.", "place1")
    assert [t.attribute for t in r.correct] == ["twin", "river", "region", "famous_for"]
    assert r.completeness == pytest.approx(4 / 6) and r.logicality == pytest.approx(-1 / 3)
    # ranks 5,2,1,3: concordant (2,3),(1,3); discordant (5,2),(5,1),(5,3),(2,1) -> (2 - 4) / 6
    r = c.check("The Orrin Lantern weighs 13 kilograms. It is kept in Kelvoth.", "artefact0")
    assert [(t.attribute, t.value) for t in r.wrong] == [("weight", 13)]
    assert [(t.attribute, t.value) for t in r.correct] == [("kept_at", "place1")]


def test_empty_answer_and_summary(world):
    c = Checker(world)
    empty = c.check("", "person0")
    assert (empty.completeness, empty.factuality, empty.logicality, len(empty.stated)) == (0.0, None, None, 0)
    full = c.check("Ilsa Brenow was born in 1801. Ilsa Brenow died in 1871.", "person1")  # 1 right, 1 wrong
    s = summarize([empty, full])
    assert s["answers"] == 2 and s["completeness"] == pytest.approx((0 + 1 / 5) / 2)
    assert s["recall_micro"] == pytest.approx(1 / 11) and s["factuality"] == pytest.approx(0.5)
    assert s["logicality"] == 1.0 and s["wrong_per_answer"] == 0.5


def test_kendall_tau_by_hand():
    assert kendall_tau([0, 1, 2, 3]) == 1.0
    assert kendall_tau([3, 2, 1, 0]) == -1.0
    assert kendall_tau([1, 0, 2]) == pytest.approx(1 / 3)  # pairs: (1,0)- (1,2)+ (0,2)+
    with pytest.raises(ValueError):
        kendall_tau([0])


def test_malformed_year_is_a_wrong_year(world):
    r = Checker(world).check("Dorvak Milen died in 190. The Orrin Lantern weighs 12 kilograms.", "person0")
    assert [(t.attribute, t.value) for t in r.wrong] == [("death_year", 190)]
    assert [(t.entity, t.attribute) for t in r.correct] == [("artefact0", "weight")]  # a number stays a number


def test_negated_sentence_states_nothing(world):
    r = Checker(world).check("Tasmora is not known for its wool. Tasmora has a population of 12400.", "place0")
    assert [(t.attribute, t.value) for t in r.stated] == [("population", 12400)]


def test_offline_backend_extracts_one_fact_per_sentence_and_rephrase_keeps_scores():
    offline = pytest.importorskip("kt_jax.knowledge.offline")
    from kt_jax.world import generate_world, splits
    from kt_jax.world.render import record

    gen = generate_world(WorldConfig(seed=0))
    checker = Checker(gen)
    items = [(q, record(gen, q)) for q in splits(gen)["train"]]
    backend = offline.OfflineBackend(cache=None, texts=[r["output"] for _, r in items])
    for q, rec in items:
        facts = backend.extract(q.instruction, rec["output"])
        assert len(facts) == len(q.attributes)
        assert all(len(checker.triples(f, q.entity_id)) == 1 for f in facts)
        rephrased = backend.rephrase(q.instruction, rec["output"])
        r = checker.check(rephrased, q.entity_id, q.attributes)
        assert (r.completeness, r.factuality, r.logicality) == (1.0, 1.0, None if len(q.attributes) < 2 else 1.0)


def test_evaluate_answers_over_questions():
    from kt_jax.world import evaluate_answers, generate_world, splits
    from kt_jax.world.render import record

    gen = generate_world(WorldConfig(seed=1))
    qs = splits(gen)["test"]
    answers = [record(gen, q)["output"] if i % 2 == 0 else "" for i, q in enumerate(qs)]
    summary, reports = evaluate_answers(gen, qs, answers)
    assert [r.completeness for r in reports] == [1.0 if i % 2 == 0 else 0.0 for i in range(len(qs))]
    assert summary["factuality"] == 1.0 and summary["answers"] == len(qs)
    with pytest.raises(ValueError):
        evaluate_answers(gen, qs, answers[:-1])
