"""RLAIF and FactTune preference pairs from hand-made samples: scripted backend (known judgments / supported facts
-> known pairs, ties skipped), the cached re-run that makes no call, and the offline backend end to end."""

from __future__ import annotations

from typing import Any

import pytest

from kt_jax.data.records import KCRecord, parse_row, to_row
from kt_jax.errors import ConfigError, DataError
from kt_jax.eval.judge import ASPECTS
from kt_jax.knowledge import make_backend
from kt_jax.knowledge.backend import CachedBackend
from kt_jax.knowledge.preferences import (
    PreferenceConfig,
    build_facttune_pairs,
    build_preferences,
    build_rlaif_pairs,
    pair_indices,
)

QUALITY = {"best answer": 3, "middle answer": 2, "worst answer": 1, "twin one": 2, "twin two": 2, "low": 1}
FACTS = {"all true": ["Fact T1.", "Fact T2."], "half true": ["Fact T1.", "Fact F1."], "all false": ["Fact F1."],
         "three quarters": ["Fact T1.", "Fact T2.", "Fact T3.", "Fact F2."], "also half": ["Fact T3.", "Fact F2."],
         "broken": []}
TRUE = {"Fact T1.", "Fact T2.", "Fact T3."}


class Scripted(CachedBackend):
    """Known answers: the judge prefers the higher QUALITY (or, biased, answer A); facts and truth from FACTS/TRUE."""

    name = "scripted"

    def __init__(self, cache: Any = None, biased: bool = False):
        super().__init__("script-1", cache, validation_retries=0)
        self.biased = biased

    def _compute(self, op: str, data: dict[str, Any], attempt: int) -> dict[str, Any]:
        if op == "judge":
            if self.biased:
                return dict.fromkeys(ASPECTS, "A")
            a, b = QUALITY[data["answer_a"]], QUALITY[data["answer_b"]]
            return dict.fromkeys(ASPECTS, "A" if a > b else "B" if b > a else "tie")
        if op == "extract":
            return {"facts": FACTS[data["answer"]]}  # [] breaks the schema: the call is rejected
        if op == "verify":
            return {"supported": data["fact"] in TRUE}
        if op == "label_fact":  # the judge's knowledge also confirms F2; F1 is contradicted
            known = TRUE | {"Fact F2."}
            return {"label": "supported" if data["fact"] in known else "contradicted"}
        raise AssertionError(op)


def _sample(answers: list[str], question: str = "Q?", **extra: Any) -> dict[str, Any]:
    return {"question": question, "input": "ctx", "reference": "the reference", "answers": answers, **extra}


def test_rlaif_best_against_worst_and_ties_skipped() -> None:
    samples = [_sample(["middle answer", "best answer", "worst answer"], "Q1?", id="a"),
               _sample(["twin one", "twin two", "twin two"], "Q2?", id="b"),  # judged equal: a tie, skipped
               _sample(["twin one", " twin one ", ""], "Q3?", id="c")]     # one distinct answer left
    out = build_rlaif_pairs(Scripted(), samples, PreferenceConfig(k=3, pairing="best_vs_worst"))
    assert out.records == [KCRecord("Q1?", "best answer", "worst answer", "rlaif", "ctx")]
    # each pairwise comparison: +-1 per aspect, for both answers
    assert out.scores[0]["scores"] == [0.0, 6.0, -6.0]
    assert [(r["id"], r["stage"]) for r in out.rejects] == [("b", "pairing"), ("c", "pairing")]
    assert "tie" in out.rejects[0]["reason"] and "1 scored answer" in out.rejects[1]["reason"]
    assert out.stats["answers_repeated"] == 2 and out.stats["answers_empty"] == 1 and out.stats["pairs"] == 1
    assert out.stats["judge_requests"] == 2 * 3 + 2 * 1  # both orders of every unordered pair


def test_samples_need_k_answers() -> None:
    with pytest.raises(DataError, match=r"samples: row 0: field 'answers': 2 answer\(s\), fewer than k=3"):
        build_rlaif_pairs(Scripted(), [_sample(["twin one", "twin two"])], PreferenceConfig(k=3))


def test_all_pairs_above_margin_and_deterministic_tie_breaking() -> None:
    sample = [_sample(["middle answer", "best answer", "worst answer"])]
    pairs = lambda m: [(r.chosen, r.rejected) for r in build_rlaif_pairs(
        Scripted(), sample, PreferenceConfig(k=3, pairing="all_pairs", margin=m)).records]
    assert pairs(0.0) == [("best answer", "middle answer"), ("middle answer", "worst answer"),
                          ("best answer", "worst answer")]
    assert pairs(6.0) == [("best answer", "worst answer")]    # 12 > 6; the neighbours differ by exactly 6
    assert pairs(12.0) == []
    # equal best scores: the earlier answer is chosen, whatever the order
    assert pair_indices([2.0, 2.0, 1.0], "best_vs_worst", 0.0) == [(0, 2)]
    assert pair_indices([1.0, 2.0, 2.0, 1.0], "best_vs_worst", 0.0) == [(1, 0)]
    assert pair_indices([None, 1.0, 0.0], "all_pairs", 0.0) == [(1, 2)]
    assert pair_indices([None, 1.0], "all_pairs", 0.0) == []


def test_rlaif_position_biased_judge_gives_no_pairs_under_strict() -> None:
    out = build_rlaif_pairs(Scripted(biased=True), [_sample(["best answer", "worst answer"])], PreferenceConfig(k=2))
    assert out.records == [] and out.scores[0]["scores"] == [0.0, 0.0]
    summed = build_rlaif_pairs(Scripted(biased=True), [_sample(["best answer", "worst answer"])],
                               PreferenceConfig(k=2, reconcile="sum"))
    assert summed.records == []  # +1 and -1 cancel


def test_facttune_precision_ranking() -> None:
    samples = [_sample(["half true", "all true", "all false", "three quarters"], "Q1?"),
               _sample(["half true", "also half", "half true", "all true"], "Q2?")]
    out = build_facttune_pairs(Scripted(), samples, PreferenceConfig(k=4))
    assert out.scores[0]["scores"] == [0.5, 1.0, 0.0, 0.75]
    assert out.records[0] == KCRecord("Q1?", "all true", "all false", "facttune", "ctx")
    assert out.scores[1]["answers"] == ["half true", "also half", "all true"]  # the repeat dropped
    assert (out.records[1].chosen, out.records[1].rejected) == ("all true", "half true")  # tie at 0.5: earlier one
    assert out.stats["check_requests"] == 2 + 2 + 1 + 4 + 2 + 2 + 2
    every = build_facttune_pairs(Scripted(), samples[:1], PreferenceConfig(k=4, pairing="all_pairs", margin=0.25))
    assert [(r.chosen, r.rejected) for r in every.records] == [("all true", "half true"), ("half true", "all false"),
                                                               ("all true", "all false"),
                                                               ("three quarters", "all false")]
    tied = build_facttune_pairs(Scripted(), [_sample(["half true", "also half"])], PreferenceConfig(k=2))
    assert tied.records == [] and "tie" in tied.rejects[0]["reason"]
    labelled = build_facttune_pairs(Scripted(), [_sample(["half true", "also half"])],
                                    PreferenceConfig(k=2, fact_check="label_fact"))
    assert labelled.scores[0]["scores"] == [0.5, 1.0]  # F2 is true by the judge's knowledge, F1 still false
    assert [(r.chosen, r.rejected) for r in labelled.records] == [("also half", "half true")]


def test_facttune_rejected_answer_is_left_out_with_its_reason() -> None:
    out = build_facttune_pairs(Scripted(), [_sample(["broken", "all true", "half true"], id=7)], PreferenceConfig(k=3))
    assert out.scores[0]["scores"] == [None, 1.0, 0.5]
    assert [(r.chosen, r.rejected) for r in out.records] == [("all true", "half true")]
    assert out.rejects[0]["id"] == 7 and out.rejects[0]["stage"] == "facttune (answer 0)"
    assert "extract" in out.rejects[0]["reason"] and "at least 1 item" in out.rejects[0]["reason"]
    alone = build_facttune_pairs(Scripted(), [_sample(["broken", "all true"])], PreferenceConfig(k=2))
    assert alone.records == [] and alone.rejects[-1]["reason"] == "1 scored answer(s); need at least 2"


def test_rerun_and_resume_make_no_repeated_backend_call(tmp_path) -> None:
    cache = tmp_path / "prefs.sqlite3"
    rlaif = [_sample(["middle answer", "best answer", "worst answer"], f"Q{i}?") for i in range(3)]
    facttune = [_sample(["half true", "all true", "all false"], f"Q{i}?") for i in range(3)]
    cfg = PreferenceConfig(k=3, workers=2)
    first = Scripted(cache)
    partial = build_rlaif_pairs(first, rlaif[:2], cfg)  # an interrupted build: two of three questions done
    build_facttune_pairs(first, facttune[:2], cfg)
    done = first.stats.get("computed")
    resumed = Scripted(cache)
    full = build_rlaif_pairs(resumed, rlaif, cfg)
    ft = build_facttune_pairs(resumed, facttune, cfg)
    assert full.records[:2] == partial.records and len(full.records) == 3 and len(ft.records) == 3
    # only the third question: 6 judge, 3 extract and 3 verify calls (T1, F1, T2: a fact shared by two answers once)
    assert resumed.stats.get("computed") == 6 + 3 + 3
    assert done == 2 * (6 + 3 + 3)
    again = Scripted(cache)
    assert build_rlaif_pairs(again, rlaif, cfg).records == full.records
    assert build_preferences(again, facttune, PreferenceConfig(method="facttune", k=3)).records == ft.records
    assert again.stats.get("computed") == 0 and again.stats.get("cache_hits") == 3 * (6 + 3 + 3)


def test_records_round_trip_as_ranking_rows() -> None:
    out = build_rlaif_pairs(Scripted(), [_sample(["worst answer", "best answer"])], PreferenceConfig(k=2))
    row = to_row(out.records[0])
    assert row == {"instruction": "Q?", "input": "ctx", "output": ["best answer", "worst answer"], "aspect": "rlaif"}
    assert parse_row(row, "kc", "x").ref_chosen_logp is None


def test_offline_backend_end_to_end() -> None:
    reference = "The Eiffel Tower is in Paris. It was completed in 1889. It is made of wrought iron."
    answers = ["The Eiffel Tower is in Paris. It was completed in 1889. It is made of wrought iron.",
               "The Eiffel Tower is in Paris.",
               "Bananas are yellow fruit that grow in warm places."]
    sample = [{"question": "Tell me about the Eiffel Tower.", "reference": reference, "answers": answers}]
    backend = make_backend("offline")
    rlaif = build_rlaif_pairs(backend, sample, PreferenceConfig(k=3))
    assert [(r.chosen, r.rejected, r.input) for r in rlaif.records] == [(answers[0], answers[2], "")]
    facttune = build_facttune_pairs(backend, sample, PreferenceConfig(k=3))
    assert facttune.scores[0]["scores"] == [1.0, 1.0, 0.0]
    assert [(r.chosen, r.rejected) for r in facttune.records] == [(answers[0], answers[2])]


def test_bad_config_and_rows_name_the_key() -> None:
    for bad, key in (({"pairing": "best"}, "pairing"), ({"k": 1}, "k"), ({"margin": -1.0}, "margin"),
                     ({"method": "ppo"}, "method"), ({"reconcile": "vote"}, "reconcile"),
                     ({"fact_check": "judge"}, "fact_check")):
        with pytest.raises(ConfigError, match=f"preferences.{key}"):
            PreferenceConfig(**bad).validate()
    with pytest.raises(DataError, match=r"s.jsonl: row 1: field 'reference'"):
        build_rlaif_pairs(Scripted(), [_sample(["a", "b"]), {"question": "q", "answers": ["a", "b"]}],
                          PreferenceConfig(k=2), where="s.jsonl")
    with pytest.raises(DataError, match=r"row 0: field 'answers': expected a list of strings"):
        build_facttune_pairs(Scripted(), [_sample("ab")], PreferenceConfig(k=2))


@pytest.mark.parametrize("batch", [False, True])
def test_anthropic_backend_against_the_fake_api_equals_offline_and_reruns_free(tmp_path, batch) -> None:
    from helpers.fake_anthropic import FakeAnthropicServer

    reference = "The Eiffel Tower is in Paris. It was completed in 1889."
    sample = [{"question": "Tell me about the Eiffel Tower.", "reference": reference,
               "answers": [reference, "The Eiffel Tower is in Rome. It was completed in 1889.", "Towers are tall."]}]
    cfg = PreferenceConfig(k=3)
    offline = make_backend("offline")
    expected = [build_rlaif_pairs(offline, sample, cfg).records, build_facttune_pairs(offline, sample, cfg).records]
    assert expected[1] and expected[1][0].rejected == "Towers are tall."

    def api(server: FakeAnthropicServer) -> Any:
        return make_backend("anthropic", base_url=server.url, api_key="k", cache=str(tmp_path / "c.sqlite3"),
                            max_retries=0, batch=batch, poll_interval=0.01)

    with FakeAnthropicServer(api_key="k") as server:
        backend = api(server)
        got = [build_rlaif_pairs(backend, sample, cfg).records, build_facttune_pairs(backend, sample, cfg).records]
        assert server.batch_creates == (3 if batch else 0)  # judge, extract, verify: one batch each
    assert got == expected
    with FakeAnthropicServer(api_key="k") as server:
        backend = api(server)
        assert [build_rlaif_pairs(backend, sample, cfg).records,
                build_facttune_pairs(backend, sample, cfg).records] == expected
        assert sum(server.http_requests.values()) == 0 and backend.stats.get("computed") == 0


def test_world_backend_pairs_are_exact(tmp_path) -> None:
    """On a generated world: the true complete answer outranks a partial one (RLAIF) and every chosen answer is all
    true while every rejected one is all false by the world's checker (both builders)."""
    from kt_jax.world import Checker, WorldConfig, generate_world, splits
    from kt_jax.world.render import record

    world = generate_world(WorldConfig(seed=0))
    backend = make_backend("world", world=str(world.save(tmp_path / "world.json")))
    questions = [q for q in splits(world)["train"] if len(q.attributes) >= 2][:5]
    samples = []
    for q in questions:
        row = record(world, q)
        facts = backend.extract(row["instruction"], row["output"])
        wrong = backend.combine(row["instruction"], backend.revise(row["instruction"], facts))
        samples.append({"question": row["instruction"], "reference": row["output"],
                        "answers": [backend.combine(row["instruction"], facts[:1]), row["output"], wrong]})
    checker = Checker(world)
    rlaif = build_rlaif_pairs(backend, samples, PreferenceConfig(k=3, workers=1))
    facttune = build_facttune_pairs(backend, samples, PreferenceConfig(k=3, workers=1))
    assert [(r.chosen, r.rejected) for r in rlaif.records] == [(s["answers"][1], s["answers"][2]) for s in samples]
    assert [s["scores"] for s in facttune.scores] == [[1.0, 1.0, 0.0]] * len(samples)
    for out in (rlaif, facttune):
        assert not out.rejects and len(out.records) == len(questions)
        for rec, q in zip(out.records, questions, strict=True):
            chosen, rejected = (checker.check(t, q.entity_id, q.attributes) for t in (rec.chosen, rec.rejected))
            assert chosen.factuality == 1.0 and not rejected.correct and rejected.wrong


def test_samples_from_predictions_join_seeds_by_id(tmp_path) -> None:
    import json

    from kt_jax.knowledge.preferences import samples_from_predictions

    def write(name: str, rows: list[tuple[int, str, str]]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": i, "question": q, "input": "", "reference": "r", "prediction": p})
                                + "\n" for i, q, p in rows))
        return str(path)

    seed0 = write("s0.jsonl", [(0, "Q0?", "a0"), (1, "Q1?", "b0")])
    seed1 = write("s1.jsonl", [(1, "Q1?", "b1"), (0, "Q0?", "a1")])
    assert samples_from_predictions([seed0, seed1]) == [
        {"id": 0, "question": "Q0?", "input": "", "reference": "r", "answers": ["a0", "a1"]},
        {"id": 1, "question": "Q1?", "input": "", "reference": "r", "answers": ["b0", "b1"]}]
    with pytest.raises(DataError, match=r"s2.jsonl: lacks id\(s\) \[1\]"):
        samples_from_predictions([seed0, write("s2.jsonl", [(0, "Q0?", "a2")])])
    with pytest.raises(DataError, match=r"s3.jsonl: row 0: field 'id': 0 is not the same question"):
        samples_from_predictions([seed0, write("s3.jsonl", [(0, "Other?", "x"), (1, "Q1?", "y")])])
    with pytest.raises(DataError, match=r"s4.jsonl: row 1: field 'id': 0 appears twice"):
        samples_from_predictions([write("s4.jsonl", [(0, "Q0?", "a"), (0, "Q0?", "b")])])
