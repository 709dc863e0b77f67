"""Offline backend rules, and the must-show run on Dolly rows (skipped when the data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kt_jax.data.records import QARecord, parse_row, to_row
from kt_jax.knowledge import make_backend
from kt_jax.knowledge.augment import attach_perplexities, build_ka, extract_facts, lexical_scorer
from kt_jax.knowledge.compare import build_kc
from kt_jax.knowledge.offline import OfflineBackend, split_facts, split_sentences, verify_by_overlap

DOLLY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "knowtuning" / "dolly_train.json"


def test_sentence_and_clause_segmentation() -> None:
    text = ("Dr. Smith moved to the U.S. in 1990. The rate rose 3.5 percent, e.g. in spring. "
            "Rain is common; snow is rare.\n- First item here\n2. Second item here")
    assert split_sentences(text) == ["Dr. Smith moved to the U.S. in 1990.",
                                     "The rate rose 3.5 percent, e.g. in spring.", "Rain is common; snow is rare.",
                                     "First item here", "Second item here"]
    facts = split_facts(text)
    assert facts[2:4] == ["Rain is common.", "Snow is rare."]
    assert facts[-1] == "Second item here."
    assert split_facts("It is cheap, but it breaks often.") == ["It is cheap.", "It breaks often."]
    assert split_facts("Just one.") == ["Just one."]
    assert split_facts("Same thing here. Same thing here.") == ["Same thing here."]  # duplicates dropped


def test_revise_swaps_values_of_the_same_kind_from_the_dataset() -> None:
    b = OfflineBackend(texts=["It opened in 1887 in Vienna. Tickets cost $40 and 12 people came in May."])
    assert b.revise_fact("The bridge was built in 1950.") == "The bridge was built in 1887."
    assert b.revise_fact("It costs $15 per day.") == "It costs $40 per day."
    assert b.revise_fact("He was born in June in a village.") == "He was born in May in a village."
    assert b.revise_fact("The capital is far from Paris today.") == "The capital is far from Vienna today."
    assert b.revise_fact("The lake is large.") == "The lake is small."          # antonym
    assert b.revise_fact("Cats can see colour.") == "Cats can not see colour."  # negation added
    assert b.revise_fact("Cats cannot fly well.") != "Cats cannot fly well."
    assert b.revise_fact("Eat slowly.").startswith("It is not true that")      # last resort, still changed


def test_operations_are_valid_and_deterministic(tmp_path) -> None:
    b = make_backend("offline", cache=tmp_path / "c.sqlite3")
    facts = b.extract("Why ski?", "Skiing is fun in 2020. It keeps you active, and it is social.")
    assert facts == ["Skiing is fun in 2020.", "It keeps you active.", "It is social."]
    revised = b.revise("Why ski?", facts)
    assert len(revised) == 3 and all(r != f for r, f in zip(revised, facts, strict=True))
    q, a = b.rewrite("Why ski?", facts[:1])
    assert "Why ski?" in q and a == facts[0]
    assert b.rephrase("Why ski?", "It is typically fun.") == "It is usually fun."
    assert b.rephrase("q", "Plain words here.") == "Plain words here."  # no rule applies: unchanged, no marker
    assert b.combine("q", ["a b", "c d."]) == "A b. C d."
    other = OfflineBackend()
    assert other.revise("Why ski?", facts) != revised or other.pool == b.pool  # the pool decides the values
    verdict = b.judge("q", "Paris is the capital of France.", "Paris is the capital of France.", "Rome is big.")
    assert verdict == {"completeness": "A", "factuality": "A", "logicality": "A"}
    assert verify_by_overlap("Paris is the capital of France.", "Paris is the capital of France. It is big.")
    assert not verify_by_overlap("Paris is not the capital of France.", "Paris is the capital of France.")
    assert not verify_by_overlap("It has 3 towers.", "It has 4 towers.")
    assert not verify_by_overlap("The lake is small.", "The lake is large.")


@pytest.mark.skipif(not DOLLY.exists(), reason="shared Dolly data absent")
def test_dolly_rows_give_facts_ka_pairs_and_valid_kc_triples(tmp_path) -> None:
    rows = json.loads(DOLLY.read_text())[:120]
    records = [QARecord(r["instruction"], r["output"], r.get("input", "")) for r in rows if r["output"].strip()]
    b = make_backend("offline", cache=tmp_path / "c.sqlite3", texts=[r.answer for r in records])
    fact_rows = extract_facts(b, records)
    assert all(r.get("facts") for r in fact_rows)
    assert sum(len(r["facts"]) for r in fact_rows) > 2 * len(records)
    ka, ka_rejects = build_ka(b, attach_perplexities(fact_rows, lexical_scorer([r.answer for r in records])))
    assert not ka_rejects
    assert [k.provenance for k in ka].count("rewritten") == len(records)
    assert all(k.answer.strip() and k.question.strip() for k in ka)
    kc, kc_rejects, stats = build_kc(b, fact_rows)
    assert not kc_rejects
    assert {k.aspect for k in kc} == {"completeness", "factuality", "logicality"}
    multi = sum(len(r["facts"]) >= 2 for r in fact_rows)
    assert stats["completeness"] == stats["logicality"] == multi and stats["factuality"] == len(records)
    for k in kc:
        assert k.chosen.strip() and k.rejected.strip() and k.rejected != k.chosen
        assert parse_row(to_row(k), "kc", "roundtrip") == k  # LLaMA-Factory ranking row, valid


def test_revise_changes_values_not_name_fragments_or_words_starting_with_an_auxiliary() -> None:
    from kt_jax.knowledge.offline import OfflineBackend

    backend = OfflineBackend()
    backend.add_texts(["Wylen Nimvo worked for the Eshfa Company.", "Ana Bel studied at the Ithom Brotherhood."])
    assert backend.revise_fact("Wylen Nimvo was a herbalist.") == "Wylen Nimvo was not a herbalist."
    assert backend.revise_fact("Dordor is known for salt.") == "Dordor is not known for salt."
    assert backend.revise_fact("It doesn't rain.") == "It does rain."
    revised = backend.revise_fact("Wylen Nimvo worked for the Eshfa Company.")
    assert revised.startswith("Wylen Nimvo worked for the ") and "Eshfa Company" not in revised


def test_label_fact_supported_contradicted_or_not_verifiable() -> None:
    from kt_jax.knowledge.offline import label_by_overlap

    ref = ("The capital of France is Paris. It was founded in 250 BC. The tower opened in 1889 and closed in 1890. "
           "Velocity can be positive or negative. Cats can see colour.")
    cases = {
        "The capital of France is Paris.": "supported",
        "The capital of France is Lyon.": "contradicted",            # another name where the reference has one
        "It was founded in 300 BC.": "contradicted",                 # another number
        "The tower opened in 1890 and closed in 1890.": "contradicted",  # a repeated year counts
        "Cats cannot see colour at night.": "contradicted",          # polarity
        "It is not true that cats can see colour.": "contradicted",  # revise's last resort
        "Velocity can be negative or negative.": "contradicted",     # a swapped antonym, counted
        "Paris hosted the 2024 Olympics.": "not_verifiable",         # true, but the reference does not say
        "The weather is nice.": "not_verifiable",
        "The tower opened in 1889.": "supported",                    # part of a sentence
    }
    assert {fact: label_by_overlap(fact, ref) for fact in cases} == cases


@pytest.mark.skipif(not DOLLY.exists(), reason="shared Dolly data absent")
def test_label_fact_on_dolly_own_facts_supported_revised_contradicted() -> None:
    from collections import Counter

    from kt_jax.knowledge.offline import label_by_overlap

    answers = [r["output"] for r in json.loads(DOLLY.read_text())[:100] if r["output"].strip()]
    backend = OfflineBackend(texts=answers)
    own, revised, other = Counter(), Counter(), Counter()
    for answer, next_answer in zip(answers, answers[1:] + answers[:1], strict=True):
        for fact in split_facts(answer):
            own[label_by_overlap(fact, answer)] += 1
            revised[label_by_overlap(backend.revise_fact(fact), answer)] += 1
        for fact in split_facts(next_answer):
            other[label_by_overlap(fact, answer)] += 1
    assert own["supported"] == own.total()
    assert revised["contradicted"] >= 0.95 * revised.total()  # measured 98.6% on the first 300 rows
    assert other["not_verifiable"] >= 0.95 * other.total()    # another question's facts: the reference is silent
