"""KA (augment) and KC (compare) builders with an injected fake scorer and a scripted backend."""

from __future__ import annotations

import random

import pytest

from kt_jax.data.records import KCRecord, QARecord, read_records, write_records
from kt_jax.errors import DataError
from kt_jax.knowledge.augment import attach_perplexities, build_ka, extract_facts, ka_keep_count, select_difficult
from kt_jax.knowledge.compare import build_kc, delete_facts, kc_delete_count, kc_subset, mix_revised, shuffle_facts
from kt_jax.knowledge.offline import OfflineBackend


def test_select_difficult_top_alpha_at_least_one_in_order() -> None:
    facts = ["a", "b", "c", "d", "e"]
    ppl = [5.0, 1.0, 9.0, 2.0, 7.0]
    assert select_difficult(facts, ppl, 0.5) == ["a", "c", "e"]  # ceil(2.5) = 3 highest, answer order
    assert select_difficult(facts, ppl, 0.5, "floor_round") == ["c", "e"]  # floor(2.5) = 2
    assert select_difficult(facts, ppl, 0.1) == ["c"]            # at least one
    assert select_difficult(facts, ppl, 1.0) == facts
    assert select_difficult(["x"], [1.0], 0.5) == ["x"]
    with pytest.raises(DataError, match="2 facts but 1"):
        select_difficult(["a", "b"], [1.0])


class Recording(OfflineBackend):
    """Offline rules, but records rewrite inputs and rejects one question."""

    def __init__(self) -> None:
        super().__init__()
        self.rewrites: list[list[str]] = []

    def _compute(self, op, data, attempt):
        if op == "rewrite":
            self.rewrites.append(data["facts"])
        if op == "rewrite" and data["question"].startswith("Bad"):
            return {"question": "", "answer": "x"}  # invalid: empty question -> rejected with a reason
        return super()._compute(op, data, attempt)


def test_build_ka_uses_the_scorer_and_keeps_provenance() -> None:
    records = [QARecord("Why is the sky blue?", "Light scatters. Blue scatters most. The sun is white. Air is thin."),
               QARecord("Bad question?", "One fact here. Another fact here."),
               QARecord("Sum?", "Two plus two is four.", input="2+2")]
    b = Recording()
    rows = extract_facts(b, records)
    calls = []

    def scorer(items):  # fake perplexity: longer facts are "harder"
        calls.append(items)
        return [[float(len(f)) for f in facts] for _, facts in items]

    scored = attach_perplexities(rows, scorer)
    assert calls[0][2] == ("Sum?\n2+2", ["Two plus two is four."])  # the input travels with the question
    ka, rejects = build_ka(b, scored, alpha=0.5)
    assert b.rewrites[0] == ["Blue scatters most.", "The sun is white."]  # top 2 of 4 by perplexity, in order
    assert [k.provenance for k in ka] == ["original", "rewritten", "original", "original", "rewritten"]
    assert ka[1].source_question == "Why is the sky blue?" and ka[4].source_question == "Sum?"
    assert rejects == [{"id": 1, "stage": "rewrite", "question": "Bad question?",
                        "reason": "rewrite: invalid answer after 1 attempts: rewrite.question: empty string"}]
    with pytest.raises(DataError, match="1 perplexities for 4 facts"):
        attach_perplexities(rows, lambda items: [[1.0] for _ in items])


def test_rounding_reproduces_the_framework_figure() -> None:
    # The paper's framework figure: facts with perplexity 19.54, 30.74, 18.86; alpha = beta = 0.5. KA keeps the
    # hardest two (19.54 and 30.74, 18.86 dropped) and KC deletes one of the three.
    facts, ppl = ["f1", "f2", "f3"], [19.54, 30.74, 18.86]
    assert select_difficult(facts, ppl, 0.5) == ["f1", "f2"]
    assert select_difficult(facts, ppl, 0.5, "floor_round") == ["f2"]
    for rounding, deleted in (("figure", 1), ("floor_round", 2)):
        kept = delete_facts(facts, 0.5, random.Random(0), rounding)
        assert len(kept) == 3 - deleted and kept == [f for f in facts if f in kept]
    # n = 3, 5, 7 at alpha = beta = 0.5: figure keeps ceil and deletes floor; floor_round keeps floor and deletes
    # Python's round (half to even: 1.5 -> 2, 2.5 -> 2, 3.5 -> 4).
    assert [ka_keep_count(n, 0.5) for n in (3, 5, 7)] == [2, 3, 4]
    assert [kc_delete_count(n, 0.5) for n in (3, 5, 7)] == [1, 2, 3]
    assert [ka_keep_count(n, 0.5, "floor_round") for n in (3, 5, 7)] == [1, 2, 3]
    assert [kc_delete_count(n, 0.5, "floor_round") for n in (3, 5, 7)] == [2, 2, 4]
    # at least one kept and one deleted; exact products are not pushed over an integer by binary error
    assert ka_keep_count(10, 0.7) == 7 and kc_delete_count(10, 0.7) == 7 and ka_keep_count(3, 0.01) == 1
    assert kc_delete_count(2, 0.1) == 1 and kc_delete_count(2, 0.9) == 1 and kc_delete_count(4, 0.99) == 3
    with pytest.raises(DataError, match="rounding: 'nearest'"):
        ka_keep_count(3, 0.5, "nearest")


def test_build_ka_and_kc_pass_the_rounding_through() -> None:
    b = OfflineBackend()
    records = [QARecord("Q?", "Fact one is here. Fact two is longer here. Fact three is the longest one here.")]
    rows = extract_facts(b, records)
    assert len(rows[0]["facts"]) == 3
    scored = attach_perplexities(rows, lambda items: [[float(len(f)) for f in facts] for _, facts in items])
    for rounding, kept in (("figure", 2), ("floor_round", 1)):
        seen = []
        backend = Recording()
        backend.rewrites = seen
        build_ka(backend, scored, alpha=0.5, rounding=rounding)
        assert len(seen[0]) == kept
    n_words = lambda text: text.count(".")
    for rounding, deleted in (("figure", 1), ("floor_round", 2)):
        kc, _, _ = build_kc(b, rows, rounding=rounding)
        assert n_words(next(k.rejected for k in kc if k.aspect == "completeness")) == 3 - deleted


def test_kc_subset_drops_one_comparison_set() -> None:
    kc = [KCRecord(f"Q{i}?", "c", "r", aspect) for i in range(2)
          for aspect in ("completeness", "factuality", "logicality")]
    for drop, gone in (("no_kcc", "completeness"), ("no_kfc", "factuality"), ("no_klc", "logicality")):
        kept = kc_subset(kc, drop)
        assert len(kept) == 4 and gone not in {k.aspect for k in kept} and kept == [k for k in kc if k in kept]
    with pytest.raises(DataError, match="drop='no_ka'"):
        kc_subset(kc, "no_ka")
    with pytest.raises(DataError, match="row 1: field 'aspect'"):
        kc_subset([kc[0], KCRecord("Q?", "c", "r")], "no_kcc")


def test_delete_shuffle_revise_rules() -> None:
    rng = random.Random(0)
    for n in range(2, 9):
        facts = [f"f{i}" for i in range(n)]
        for beta in (0.1, 0.5, 0.9):
            kept = delete_facts(facts, beta, rng)
            assert 1 <= len(kept) <= n - 1 and kept == [f for f in facts if f in kept]
        for _ in range(20):
            perm = shuffle_facts(facts, rng)
            assert sorted(perm) == facts and perm != facts
    assert shuffle_facts(["a", "b"], rng) == ["b", "a"]
    with pytest.raises(DataError, match="at least 2"):
        delete_facts(["a"], 0.5, rng)
    mixed = mix_revised(["a", "b", "c", "d"], ["A", "B", "C", "D"], 0.25, rng)
    assert sum(x.isupper() for x in mixed) == 1


def test_build_kc_three_aspects_and_single_fact_rule(tmp_path) -> None:
    b = OfflineBackend(texts=["Built in 1901 by Ann Lee."])
    records = [QARecord("Q1?", "The tower is large. It was built in 1850. It is made of iron."),
               QARecord("Q2?", "Only one fact is here.")]
    rows = extract_facts(b, records)
    kc, rejects, stats = build_kc(b, rows, seed=3)
    assert not rejects
    assert [k.aspect for k in kc] == ["completeness", "factuality", "logicality", "factuality"]
    assert stats["single_fact"] == 1
    chosen = b.rephrase("Q1?", records[0].answer)
    assert all(k.chosen == chosen for k in kc[:3]) and all(k.rejected != k.chosen for k in kc)
    assert kc[1].rejected == "The tower is small. It was built in 1901. It is not made of iron."
    llm, _, _ = build_kc(b, rows, seed=3, combine="llm")
    assert [k.rejected for k in llm] == [k.rejected for k in kc]  # offline combine == concatenation
    path = write_records(tmp_path / "kc.json", kc)
    back, _ = read_records(path, "kc")
    assert back == kc and isinstance(back[0], KCRecord)
    assert '"output": [\n      "' in path.read_text()  # LLaMA-Factory ranking rows: output = [chosen, rejected]
