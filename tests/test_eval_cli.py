"""`kt-jax generate` then `kt-jax eval` end to end on a tiny checkpoint with a trained BPE tokenizer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from helpers.hf_fixtures import LLAMA2_TINY, make_hf_llama

from kt_jax import cli
from kt_jax.data.templates import alpaca_prompt
from kt_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from kt_jax.inference.sampling import SamplingConfig, generate
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


def test_generate_file_library_call_writes_what_the_command_writes(model_dir, test_set, tmp_path, capsys) -> None:
    from kt_jax.errors import ConfigError
    from kt_jax.inference.generate_file import GenerateConfig, generate_file
    from kt_jax.sharding import make_mesh

    assert _generate(model_dir, test_set, tmp_path / "cli", "--preset", "greedy", "--limit", "3") == 0
    cfg = GenerateConfig(model=str(model_dir), data=str(test_set), out=str(tmp_path / "lib"), preset="greedy",
                         max_new_tokens=12, limit=3, batch_size=4, chunk=2)
    summary = generate_file(cfg, mesh=make_mesh(1, 8, 1), progress=False)
    assert summary["predictions"] == 3 and summary["new"] == 3 and summary["new_tokens"] > 0
    cli_text = (tmp_path / "cli" / "predictions.jsonl").read_text()
    assert (tmp_path / "lib" / "predictions.jsonl").read_text() == cli_text  # byte for byte: the same format
    assert set(json.loads(cli_text.splitlines()[0])) == {"id", "question", "input", "reference", "prediction",
                                                         "new_tokens", "finished"}
    stamp = json.loads((tmp_path / "lib" / "generate_config.json").read_text())
    assert stamp["stamp"]["sampling"] == {"max_new_tokens": 12, "do_sample": False, "temperature": 1.0, "top_k": 0,
                                          "top_p": 1.0} and stamp["info"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert generate_file(cfg, mesh=None, progress=False)["new"] == 0  # another mesh: nothing to redo
    with pytest.raises(ConfigError, match="differs in sampling, seed"):
        generate_file(dataclasses.replace(cfg, temperature=0.7, seed=1), mesh=None, progress=False)
    with pytest.raises(ConfigError, match="top_p"):
        generate_file(dataclasses.replace(cfg, top_p=0.0), mesh=None, progress=False)
    assert "to go" not in capsys.readouterr().out.split("wrote")[-1]  # the library call printed nothing


def test_evaluate_files_library_call(tmp_path) -> None:
    from kt_jax.errors import ConfigError
    from kt_jax.eval.job import EvalConfig, evaluate_files

    paths = {}
    for name, cut in (("half", lambda a: a[: len(a) // 2]), ("full", lambda a: a)):
        paths[name] = str(tmp_path / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps({"id": i, "question": q["instruction"],
                                                         "reference": q["output"], "prediction": cut(q["output"])})
                                             + "\n" for i, q in enumerate(QA)))
    cfg = EvalConfig(predictions=paths, out=str(tmp_path / "eval"), bertscore=False,
                     backend_options={"cache": "none"})
    summary = evaluate_files(cfg, progress=False)
    assert summary["metrics"] == json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["metrics"]["full"]["rouge_l"] == pytest.approx(1.0) and summary["metrics"]["half"]["rouge_l"] < 0.9
    assert summary["baseline"] == "half" and summary["judge"] == {} and Path(summary["report"]).is_file()
    recorded = json.loads((tmp_path / "eval" / "eval_config.json").read_text())
    assert recorded["backend_options"] == ["cache"] and recorded["predictions"] == paths  # option names only
    with pytest.raises(ConfigError, match="'zzz' is not one of the systems"):
        evaluate_files(dataclasses.replace(cfg, baseline="zzz"))
