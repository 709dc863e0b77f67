"""Pairwise judge (both orders, reconciled), fine-grained fact counts, and the report with its plots."""

from __future__ import annotations

import threading

import pytest

from kt_jax.errors import BackendError, ConfigError, DataError
from kt_jax.eval.facts import evaluate_facts, fact_summary
from kt_jax.eval.judge import ASPECTS, PairItem, judge_pairs, pair_items, position_consistency, reconcile, win_tie_lose
from kt_jax.eval.report import write_report


class FakeBackend:
    """Judges by answer length (or always 'A' when biased); facts are sentences, true if in the reference."""

    def __init__(self, biased: bool = False):
        self.biased, self.calls, self.lock = biased, [], threading.Lock()

    def judge(self, question, reference, answer_a, answer_b):
        with self.lock:
            self.calls.append((answer_a, answer_b))
        if self.biased:
            return dict.fromkeys(ASPECTS, "A")
        v = "A" if len(answer_a) > len(answer_b) else "B" if len(answer_b) > len(answer_a) else "tie"
        return {"completeness": v, "factuality": "tie", "logicality": "B" if v == "A" else "A"}

    def extract(self, question, answer):
        return [s.strip() for s in answer.split(".") if s.strip()]

    def verify(self, question, fact, reference):
        return fact.lower() in reference.lower()


def test_reconcile_rules() -> None:
    # the system is answer A in the first verdict and answer B in the second
    assert reconcile("A", "B") == "win" and reconcile("B", "A") == "lose"
    assert reconcile("A", "A") == "tie" and reconcile("B", "B") == "tie"  # position bias: no winner
    assert reconcile("A", "tie") == "tie" and reconcile("tie", "tie") == "tie"
    assert reconcile("A", "tie", "sum") == "win" and reconcile("tie", "A", "sum") == "lose"
    assert reconcile("A", "A", "sum") == "tie"
    with pytest.raises(ConfigError, match="majority"):
        reconcile("A", "B", "majority")
    with pytest.raises(BackendError, match="'C'"):
        reconcile("C", "A")


ITEMS = [PairItem("q1", "ref", "a long detailed answer", "short"),
         PairItem("q2", "ref", "tiny", "a much longer baseline answer"),
         PairItem("q3", "ref", "same", "same")]


def test_judge_pairs_both_orders_and_tables() -> None:
    backend = FakeBackend()
    results = judge_pairs(backend, ITEMS, workers=2)
    assert sorted(backend.calls) == sorted([(i.answer, i.baseline) for i in ITEMS] +
                                           [(i.baseline, i.answer) for i in ITEMS])
    assert [r["outcome"]["completeness"] for r in results] == ["win", "lose", "tie"]
    assert [r["outcome"]["logicality"] for r in results] == ["lose", "win", "tie"]  # q3: "A" twice = bias
    table = win_tie_lose(results)
    assert table["completeness"] == {"win": 1, "tie": 1, "lose": 1, "win_pct": pytest.approx(100 / 3),
                                     "tie_pct": pytest.approx(100 / 3), "lose_pct": pytest.approx(100 / 3),
                                     "errors": 0}
    assert table["factuality"]["tie"] == 3
    assert position_consistency(results)["completeness"] == 100.0


def test_position_biased_judge_yields_ties() -> None:
    results = judge_pairs(FakeBackend(biased=True), ITEMS)
    assert all(r["outcome"][a] == "tie" for r in results for a in ASPECTS)
    assert position_consistency(results) == dict.fromkeys(ASPECTS, 0.0)
    assert all(r["ab"]["factuality"] == "A" and r["ba"]["factuality"] == "A" for r in results)


def test_judge_missing_aspect_is_an_error() -> None:
    class Partial(FakeBackend):
        def judge(self, *args):
            return {"completeness": "A"}

    (result,) = judge_pairs(Partial(), ITEMS[:1])
    assert "no verdict for factuality, logicality" in result["error"]


def test_rejected_items_are_left_out_and_fatal_errors_stop() -> None:
    from kt_jax.knowledge.backend import FatalBackendError, Rejected

    class Flaky(FakeBackend):
        def judge(self, question, reference, a, b):
            if question == "q2":
                raise Rejected("judge", "invalid answer after 3 attempts")
            return super().judge(question, reference, a, b)

        def extract(self, question, answer):
            if question == "bad":
                raise Rejected("extract", "truncated")
            return super().extract(question, answer)

    results = judge_pairs(Flaky(), ITEMS)
    assert "invalid answer" in results[1]["error"]
    table = win_tie_lose(results)
    assert table["completeness"]["win"] + table["completeness"]["tie"] + table["completeness"]["lose"] == 2
    assert table["completeness"]["errors"] == 1 and table["completeness"]["win_pct"] == 50.0
    summary = fact_summary(evaluate_facts(Flaky(), [("bad", "X.", "x"), ("ok", "X. Y.", "x")]))
    assert summary["errors"] == 1 and summary["facts_total"] == 2 and summary["correct_pct"] == 50.0

    class Fatal(FakeBackend):
        def judge(self, *args):
            raise FatalBackendError("anthropic judge: HTTP 401")

    with pytest.raises(FatalBackendError, match="401"):
        judge_pairs(Fatal(), ITEMS)


def test_pair_items_join_on_id() -> None:
    sys_rows = [{"id": 1, "question": "q", "reference": "r", "prediction": "x"}]
    base_rows = [{"id": 1, "question": "q", "reference": "r", "prediction": "y"}]
    assert pair_items(sys_rows, base_rows) == [PairItem("q", "r", "x", "y")]
    with pytest.raises(DataError, match=r"lack id\(s\) \[1\]"):
        pair_items(sys_rows, [])


def test_fact_evaluation_counts() -> None:
    items = [("q1", "Paris is in France. Paris is big. The moon is cheese.", "paris is in france; paris is big"),
             ("q2", "", "anything"),
             ("q3", "Water is wet.", "water is dry")]
    results = evaluate_facts(FakeBackend(), items)
    assert [r["correct"] for r in results] == [[True, True, False], [], [False]]
    summary = fact_summary(results)
    assert summary["facts_total"] == 4 and summary["facts_per_answer"] == pytest.approx(4 / 3)
    assert summary["correct_pct"] == pytest.approx(50.0)
    assert summary["correct_pct_macro"] == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_report_renders_with_plots(tmp_path) -> None:
    from matplotlib.image import imread

    results = judge_pairs(FakeBackend(), ITEMS)
    path = write_report(
        tmp_path,
        metrics={"kt": {"meteor": 0.31, "rouge_l": 0.22, "bertscore_f1": 0.85},
                 "sft": {"meteor": 0.29, "rouge_l": 0.20, "bertscore_f1": 0.84}},
        judge={"kt vs sft": win_tie_lose(results)},
        consistency={"kt vs sft": position_consistency(results)},
        facts={"kt": fact_summary(evaluate_facts(FakeBackend(), [("q", "A. B.", "a")])),
               "sft": fact_summary(evaluate_facts(FakeBackend(), [("q", "A.", "a")]))},
        meta={"test set": "toy", "judge": "fake"},
    )
    text = path.read_text()
    assert "| completeness | 1 | 1 | 1 | 33.33 | 33.33 | 33.33 | 100.00 |" in text
    assert "| kt | 0.85 | 0.31 | 0.22 |" in text
    assert "| sft | 1 | 1.00 | 1 | 100.00 | 100.00 |" in text
    for png in ("metrics.png", "judge_kt_vs_sft.png", "facts_count.png", "facts_correct.png"):
        assert f"plots/{png}" in text
        image = imread(tmp_path / "plots" / png)
        assert image.shape[0] > 100 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # not a blank canvas
