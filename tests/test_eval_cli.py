"""`kt-jax generate` then `kt-jax eval` end to end on a tiny checkpoint with a trained BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.hf_fixtures import LLAMA2_TINY, make_hf_llama

from kt_jax import cli
from kt_jax.data.templates import alpaca_prompt
from kt_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from kt_jax.generate import SamplingConfig, generate
from kt_jax.model.hf import load_pretrained

QA = [
    {"instruction": "What organ makes insulin?", "input": "", "output": "The pancreas makes insulin."},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Summarise:", "input": "Cats sleep a lot.", "output": "Cats sleep much of the day."},
    {"instruction": "Why is the sky blue?", "input": "", "output": "Rayleigh scattering of sunlight."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "Four."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_hf_llama(tmp_path_factory.mktemp("tiny"), seed=4, **{**LLAMA2_TINY, "vocab_size": 320})
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in QA] * 20
    train_bpe_tokenizer(texts + [alpaca_prompt("x")] * 5, 320, path)
    return path


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.json"
    path.write_text(json.dumps(QA))
    return path


def _generate(model_dir, test_set, out, *extra) -> int:
    return cli.main(["generate", "--model", str(model_dir), "--data", str(test_set), "--out", str(out),
                     "--max-new-tokens", "12", "--mesh-data", "2", "--mesh-fsdp", "4", "--batch-size", "4",
                     *extra])


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_writes_resumable_predictions(model_dir, test_set, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _generate(model_dir, test_set, out, "--preset", "greedy", "--limit", "3", "--chunk", "2") == 0
    rows = _rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[2]["input"] == "Cats sleep a lot." and rows[0]["reference"] == QA[0]["output"]
    tok = load_tokenizer(model_dir)
    prompts = [alpaca_prompt(q["instruction"], q["input"]) for q in QA[:3]]
    expected = generate(load_pretrained(model_dir), tok, prompts, SamplingConfig.greedy(12), max_prompt_len=1024)
    assert [r["prediction"] for r in rows] == expected
    assert all(0 < r["new_tokens"] <= 12 for r in rows)
    assert "wrote" in capsys.readouterr().out


def test_generate_refuses_a_changed_config_and_resumes(model_dir, test_set, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert _generate(model_dir, test_set, out, "--preset", "greedy", "--limit", "2") == 0
    assert cli.main(["generate", "--model", str(model_dir), "--data", str(test_set), "--out", str(out),
                     "--max-new-tokens", "12", "--preset", "knowtuning", "--limit", "2"]) == 2
    assert "different config" in capsys.readouterr().err
    with open(out / "predictions.jsonl") as fh:
        first = fh.readline()
    (out / "predictions.jsonl").write_text(first)  # as if killed after one row
    assert _generate(model_dir, test_set, out, "--preset", "greedy", "--limit", "2") == 0
    assert "1 already answered, 1 to go" in capsys.readouterr().out
    assert [r["id"] for r in _rows(out / "predictions.jsonl")] == [0, 1]


def test_eval_writes_report_for_two_systems(model_dir, test_set, tmp_path, capsys) -> None:
    greedy, sampled = tmp_path / "greedy", tmp_path / "sampled"
    assert _generate(model_dir, test_set, greedy, "--preset", "greedy") == 0
    assert _generate(model_dir, test_set, sampled, "--preset", "knowtuning", "--seed", "3") == 0
    out = tmp_path / "eval"
    code = cli.main(["eval", "--predictions", f"greedy={greedy / 'predictions.jsonl'}",
                     "--predictions", f"sampled={sampled / 'predictions.jsonl'}", "--out", str(out),
                     "--no-bertscore"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"greedy", "sampled"} and set(metrics["greedy"]) == {"meteor", "rouge_l"}
    per = _rows(out / "metrics_greedy.jsonl")
    assert len(per) == len(QA)
    assert metrics["greedy"]["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in per) / len(per))
    report = (out / "report.md").read_text()
    assert "| greedy |" in report and (out / "plots" / "metrics.png").stat().st_size > 1000
    assert cli.main(["eval", "--predictions", f"a={greedy / 'predictions.jsonl'}", "--out", str(out),
                     "--baseline", "zzz", "--no-bertscore"]) == 2
    assert "--baseline 'zzz'" in capsys.readouterr().err


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowtuning" / "dolly_valid.json"


@pytest.mark.skipif(not REAL.is_file(), reason="real Dolly data absent")
def test_eval_on_real_dolly_answers_ranks_full_answers_above_first_sentences(tmp_path, capsys) -> None:
    """Real answers vs their own first sentence: every metric and the offline judge prefer the full answer."""
    import re

    from kt_jax.data.records import read_records

    records, _ = read_records(REAL)
    paths = {}
    for name, cut in (("first", lambda a: re.split(r"(?<=[.!?])\s", a)[0]), ("full", lambda a: a)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"id": i, "question": r.question, "reference": r.answer,
                                                   "prediction": cut(r.answer)}) + "\n"
                                       for i, r in enumerate(records[:30])))
    out = tmp_path / "eval"
    assert cli.main(["eval", "--predictions", f"first={paths['first']}", "--predictions", f"full={paths['full']}",
                     "--out", str(out), "--no-bertscore", "--judge", "--facts", "--backend", "offline",
                     "--backend-option", "cache=none"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["full"]["rouge_l"] == pytest.approx(1.0) and metrics["first"]["rouge_l"] < 0.8
    assert metrics["full"]["meteor"] > 0.99 > metrics["first"]["meteor"]
    judged = json.loads((out / "judge.json").read_text())
    table = judged["win_tie_lose"]["full vs first"]["completeness"]
    assert table["win"] > 15 and table["lose"] == 0
    assert judged["facts"]["full"]["facts_per_answer"] > judged["facts"]["first"]["facts_per_answer"]
