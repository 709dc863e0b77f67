"""FActScore-style fact evaluation: labels from a scripted backend and the offline rules, the summary's named
ratios, the report table, the versioned cached prompt, and the Anthropic backend against the local fake API."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.fake_anthropic import FakeAnthropicServer

from kt_jax.errors import ConfigError, DataError
from kt_jax.eval.facts import evaluate_facts, fact_summary
from kt_jax.eval.report import write_report
from kt_jax.knowledge import make_backend, prompts
from kt_jax.knowledge.backend import CachedBackend, Rejected
from kt_jax.knowledge.cache import cache_key

KEY = "sk-ant-facts-secret"
REF = "The Eiffel Tower is in Paris. It was completed in 1889. It is made of wrought iron."
ANSWER = "The Eiffel Tower is in Paris. It was completed in 1899. It is painted every seven years."
LABEL_OF = {"S": "supported", "C": "contradicted", "N": "not_verifiable"}


class Scripted(CachedBackend):
    """Facts are the sentences; a fact's first letter gives its label (S / C / N); question 'bad' is rejected."""

    name = "scripted-facts"

    def __init__(self, cache: Any = None, label: str | None = None):
        super().__init__("script-1", cache, validation_retries=0)
        self.label = label

    def _compute(self, op: str, data: dict[str, Any], attempt: int) -> dict[str, Any]:
        if op == "extract":
            if data["question"] == "bad":
                raise ValueError("truncated")
            return {"facts": [s.strip() + "." for s in data["answer"].split(".") if s.strip()]}
        if op == "label_fact":
            return {"label": self.label or LABEL_OF[data["fact"][0]]}
        raise AssertionError(op)


def test_scripted_labels_give_the_named_ratios() -> None:
    items = [("q1", "S1. S2. C1. N1.", "r"), ("q2", "S3. N2.", "r"), ("q3", "", "r"), ("q4", "C2.", "r"),
             ("bad", "S4.", "r")]
    results = evaluate_facts(Scripted(), items, method="factscore", workers=2)
    assert results[0] == {"facts": ["S1.", "S2.", "C1.", "N1."],
                          "labels": ["supported", "supported", "contradicted", "not_verifiable"]}
    assert results[2] == {"facts": [], "labels": []} and "truncated" in results[4]["error"]
    summary = fact_summary(results)
    assert summary == pytest.approx({
        "answers": 4, "facts_total": 7, "facts_per_answer": 7 / 4, "errors": 1,
        "supported_per_answer": 3 / 4, "contradicted_per_answer": 2 / 4, "not_verifiable_per_answer": 2 / 4,
        "precision_pct": 100 * 3 / 5,                        # supported / (supported + contradicted)
        "supported_pct": 100 * 3 / 7,                        # supported / all facts
        "supported_pct_macro": 100 * (2 / 4 + 1 / 2 + 0) / 3,  # mean over the answers that have facts
    })


def test_offline_labels_separate_omitted_truths_from_errors() -> None:
    backend = make_backend("offline")
    [labelled] = evaluate_facts(backend, [("Tell me about the Eiffel Tower.", ANSWER, REF)], method="factscore")
    assert labelled["facts"] == ["The Eiffel Tower is in Paris.", "It was completed in 1899.",
                                 "It is painted every seven years."]
    assert labelled["labels"] == ["supported", "contradicted", "not_verifiable"]
    [checked] = evaluate_facts(backend, [("Tell me about the Eiffel Tower.", ANSWER, REF)], method="reference")
    assert checked["correct"] == [True, False, False]  # the reference-only check counts the omitted fact wrong
    assert fact_summary([labelled])["precision_pct"] == 50.0 and fact_summary([checked])["correct_pct"] == 100 / 3


def test_bad_method_mixed_results_and_bad_labels() -> None:
    with pytest.raises(ConfigError, match="fact method 'facts'"):
        evaluate_facts(Scripted(), [], method="facts")
    with pytest.raises(DataError, match="mix"):
        fact_summary([{"facts": [], "labels": []}, {"facts": [], "correct": []}])

    class Loose:  # a duck-typed backend that skips schema validation
        def extract(self, question, answer):
            return ["A fact."]

        def label_fact(self, question, fact, reference):
            return "maybe"

    [result] = evaluate_facts(Loose(), [("q", "a", "r")], method="factscore")
    assert "'maybe' is not one of" in result["error"]
    with pytest.raises(ValueError, match=r"label_fact\.label: 'yes' is not one of"):
        prompts.validate("label_fact", {}, {"label": "yes"})


def test_label_prompt_is_versioned_and_cached(tmp_path) -> None:
    assert prompts.op_version("label_fact") == "kt-fact-label-v1" != prompts.PROMPT_VERSION
    assert prompts.op_version("verify") == prompts.PROMPT_VERSION  # older operations keep their cache keys
    backend = Scripted(tmp_path / "c.sqlite3")
    data = {"question": "q", "fact": "S.", "reference": "r"}
    assert backend.key("label_fact", data) == cache_key("scripted-facts", "script-1", "kt-fact-label-v1",
                                                        "label_fact", data)
    assert backend.key("verify", data) == cache_key("scripted-facts", "script-1", "kt-knowledge-v1", "verify", data)
    items = [("q1", "S1. C1.", "r"), ("q2", "N1.", "r")]
    first = evaluate_facts(backend, items, method="factscore")
    assert backend.stats.get("computed") == 2 + 3
    again = Scripted(tmp_path / "c.sqlite3", label="contradicted")  # a changed answer would show: it is not asked
    assert evaluate_facts(again, items, method="factscore") == first and again.stats.get("computed") == 0
    with pytest.raises(Rejected, match="truncated"):
        again.extract("bad", "S.")
    assert "own reliable knowledge" in prompts.INSTRUCTIONS["label_fact"]


def test_facts_through_the_fake_api_equal_the_offline_rules(tmp_path) -> None:
    items = [("Tell me about the Eiffel Tower.", ANSWER, REF), ("Tell me about the Eiffel Tower.", REF, REF)]

    def api(server: FakeAnthropicServer) -> Any:
        return make_backend("anthropic", base_url=server.url, api_key=KEY, cache=str(tmp_path / "cache.sqlite3"),
                            max_retries=0)

    with FakeAnthropicServer(api_key=KEY) as server:
        via_api = evaluate_facts(api(server), items, method="factscore")
        asked = [op for op, _ in server.calls]  # distinct requests
    assert via_api == evaluate_facts(make_backend("offline"), items, method="factscore")
    assert asked.count("label_fact") == 5 and asked.count("extract") == 2  # 3 + 3 facts, one shared
    assert via_api[1]["labels"] == ["supported"] * 3
    with FakeAnthropicServer(api_key=KEY) as server:
        assert evaluate_facts(api(server), items, method="factscore") == via_api
        assert sum(server.http_requests.values()) == 0  # all from the cache


def test_report_has_the_factscore_table_beside_the_reference_one(tmp_path) -> None:
    from matplotlib.image import imread

    labelled = fact_summary(evaluate_facts(Scripted(), [("q", "S1. C1. N1.", "r"), ("q2", "S2.", "r")],
                                           method="factscore"))
    checked = fact_summary([{"facts": ["a", "b"], "correct": [True, False]}])
    text = write_report(tmp_path, facts={"kt": labelled, "old": checked}).read_text()
    assert "| system | answers | facts / answer | supported / answer | contradicted / answer | not verifiable / " \
           "answer | precision % | supported / all % | supported / all % (per answer) |" in text
    assert "| kt | 2 | 2.00 | 1.00 | 0.50 | 0.50 | 66.67 | 50.00 | 66.67 |" in text
    assert "| old | 1 | 2.00 | 2 | 50.00 | 50.00 |" in text
    for png in ("facts_labels.png", "facts_precision.png", "facts_count.png", "facts_correct.png"):
        assert f"plots/{png}" in text and imread(tmp_path / "plots" / png)[..., :3].std() > 0.05
