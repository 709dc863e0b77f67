"""The judge and fact checks through the Anthropic backend against the local fake Messages API (no network)."""

from __future__ import annotations

import json

import pytest
from helpers.fake_anthropic import FakeAnthropicServer

from kt_jax import cli
from kt_jax.eval.facts import evaluate_facts, fact_summary
from kt_jax.eval.judge import ASPECTS, PairItem, judge_pairs, position_consistency, win_tie_lose
from kt_jax.knowledge import make_backend, prompts

KEY = "sk-ant-test-secret-123"
REF = "The pancreas makes insulin. Insulin lowers blood sugar. Diabetes follows when insulin is lacking."
ITEMS = [
    PairItem("What does insulin do?", REF, REF, "The pancreas makes insulin."),  # complete vs partial
    PairItem("What does insulin do?", REF, "Insulin is made by the liver.", REF),
    PairItem("Who makes insulin?", "The pancreas makes insulin.", "The pancreas makes insulin.",
             "The pancreas makes insulin."),
]


class BiasedServer(FakeAnthropicServer):
    """A judge model with full position bias: whatever it is shown first wins every aspect."""

    def answer(self, params, fault=None):
        message = super().answer(params, fault)
        if params["tool_choice"]["name"].endswith("judge"):
            message["content"][0]["input"] = dict.fromkeys(ASPECTS, "A")
        return message


def _backend(server, tmp_path, **extra):
    return make_backend("anthropic", base_url=server.url, api_key=KEY, cache=str(tmp_path / "cache.sqlite3"),
                        max_retries=0, **extra)


def _orders_seen(server) -> set[tuple[str, str]]:
    return {(d["answer_a"], d["answer_b"]) for (op, text), _ in server.calls.items() if op == "judge"
            for d in [prompts.decode_data(text)]}


def test_judge_through_fake_api_judges_both_orders_and_caches(tmp_path) -> None:
    with FakeAnthropicServer(api_key=KEY) as server:
        backend = _backend(server, tmp_path)
        results = judge_pairs(backend, ITEMS, workers=3)
        seen = _orders_seen(server)
        for item in ITEMS:
            assert (item.answer, item.baseline) in seen and (item.baseline, item.answer) in seen
        calls = sum(server.calls.values())
        assert calls == len(seen) == 5  # item 3 has equal answers: both orders are the same request (cached)
        again = judge_pairs(_backend(server, tmp_path), ITEMS)
        assert sum(server.calls.values()) == calls  # every verdict came from the cache
    assert again == results
    assert [r["outcome"]["completeness"] for r in results] == ["win", "lose", "tie"]
    assert results[2]["outcome"] == dict.fromkeys(ASPECTS, "tie")
    assert position_consistency(results) == dict.fromkeys(ASPECTS, 100.0)


def test_position_biased_judge_is_neutralised_by_the_swap(tmp_path) -> None:
    with BiasedServer(api_key=KEY) as server:
        results = judge_pairs(_backend(server, tmp_path), ITEMS[:2])
    assert all(r["ab"] == dict.fromkeys(ASPECTS, "A") == r["ba"] for r in results)
    table = win_tie_lose(results)
    assert all(table[a]["tie"] == 2 and table[a]["win"] == table[a]["lose"] == 0 for a in ASPECTS)
    assert position_consistency(results) == dict.fromkeys(ASPECTS, 0.0)
    with BiasedServer(api_key=KEY) as server:
        summed = judge_pairs(_backend(server, tmp_path / "sum"), ITEMS[:2], rule="sum")
    assert all(r["outcome"][a] == "tie" for r in summed for a in ASPECTS)  # +1 and -1 cancel


def test_facts_through_fake_api_equal_the_offline_rules(tmp_path) -> None:
    items = [("What does insulin do?", "The pancreas makes insulin. Insulin raises blood sugar.", REF),
             ("What does insulin do?", "", REF)]
    with FakeAnthropicServer(api_key=KEY) as server:
        via_api = evaluate_facts(_backend(server, tmp_path), items)
    offline = evaluate_facts(make_backend("offline"), items)
    assert via_api == offline
    assert via_api[0]["facts"] and via_api[1] == {"facts": [], "correct": []}
    assert fact_summary(via_api)["facts_total"] == len(via_api[0]["facts"])


def test_eval_command_with_judge_and_facts_keeps_the_key_secret(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KT_TEST_JUDGE_KEY", KEY)
    rows = {"sys": [], "base": []}
    for i, item in enumerate(ITEMS):
        rows["sys"].append({"id": i, "question": item.question, "reference": item.reference,
                            "prediction": item.answer})
        rows["base"].append({"id": i, "question": item.question, "reference": item.reference,
                             "prediction": item.baseline})
    for name, data in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "eval"
    with FakeAnthropicServer(api_key=KEY) as server:
        code = cli.main(["eval", "--predictions", f"base={tmp_path / 'base.jsonl'}",
                         "--predictions", f"sys={tmp_path / 'sys.jsonl'}", "--out", str(out), "--no-bertscore",
                         "--judge", "--facts", "--backend", "anthropic",
                         "--backend-option", f"base_url={server.url}",
                         "--backend-option", "api_key_env=KT_TEST_JUDGE_KEY",
                         "--backend-option", f"cache={tmp_path / 'cache.sqlite3'}"])
    assert code == 0
    judged = json.loads((out / "judge.json").read_text())
    assert judged["win_tie_lose"]["sys vs base"]["completeness"]["win"] == 1
    assert set(judged["facts"]) == {"base", "sys"}
    report = (out / "report.md").read_text()
    assert "### sys vs base" in report and (out / "plots" / "judge_sys_vs_base.png").is_file()
    assert len((out / "judge_sys_vs_base.jsonl").read_text().splitlines()) == len(ITEMS)
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".png":
            assert KEY not in path.read_text(), path
    assert KEY not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["offline"])
def test_offline_backend_judges_without_network(kind) -> None:
    results = judge_pairs(make_backend(kind), ITEMS)
    assert results[0]["outcome"]["completeness"] == "win"
