"""`kt-jax knowledge extract|augment|compare|all` with the offline backend: files, resume, scorers, errors."""

from __future__ import annotations

import json
import math

import pytest

from kt_jax import cli
from kt_jax.data.records import read_records

ROWS = [
    {"instruction": "Why is the sky blue?", "input": "", "output": "Sunlight scatters off air molecules. Blue light "
     "scatters more than red light. The sun itself is white."},
    {"instruction": "Who built the tower?", "input": "", "output": "Gustave Eiffel built the tower in 1889."},
    {"instruction": "Summarise the text.", "input": "Rome was founded in 753 BC.", "output": "Rome is old; it was "
     "founded in 753 BC, and it grew into an empire."},
    {"instruction": "Empty one?", "input": "", "output": "  "},
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(ROWS))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_all_stages_write_alpaca_and_ranking_files_and_resume(data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["knowledge", "all", f"data={data}", f"out={out}", "scorer=lexical", "alpha=0.5"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "rows: 3" in first and "KA rewritten: 3" in first and "skipped 1 empty-answer" in first
    facts = _read(out / "facts.jsonl")
    assert [r["id"] for r in facts] == [0, 1, 2] and facts[2]["input"] == "Rome was founded in 753 BC."
    assert facts[0]["facts"][1] == "Blue light scatters more than red light."
    ka, _ = read_records(out / "ka.json", "ka")
    assert [k.provenance for k in ka].count("original") == 3 and ka[1].source_question == "Why is the sky blue?"
    assert _read(out / "ka.jsonl") == json.loads((out / "ka.json").read_text())
    kc, _ = read_records(out / "kc.json", "kc")
    assert [k.aspect for k in kc].count("factuality") == 3 and all(k.chosen != k.rejected for k in kc)
    assert "KC single_fact: 1" in first  # the Eiffel answer has one fact: only a factuality pair
    assert (out / "knowledge_config.yaml").exists() and (out / "rejects_compare.jsonl").read_text() == ""
    summary = json.loads((out / "summary_all.json").read_text())
    assert summary["stats"]["facts"] == sum(len(r["facts"]) for r in facts)
    before = {p.name: p.read_text() for p in out.glob("k[ac].json")}
    assert cli.main(argv) == 0
    again = capsys.readouterr().out
    assert "0 calls" in again and "cache hits" in again  # resumed entirely from the cache
    assert {p.name: p.read_text() for p in out.glob("k[ac].json")} == before
    assert cli.main(["knowledge", "compare", f"data={data}", f"out={out}", "beta=0.3", "seed=1"]) == 0
    assert "0 calls" in capsys.readouterr().out  # compare reuses facts.jsonl and cached rephrase/revise


def test_file_scorer_uses_kt_jax_score_output(data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert cli.main(["knowledge", "extract", f"data={data}", f"out={out}"]) == 0
    facts = _read(out / "facts.jsonl")
    # a `kt-jax score` output: the last fact of every answer is the hardest; None = no tokens
    scored = [{**r, "ppl": [None] + [float(i) for i in range(1, len(r["facts"]))]} for r in facts]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    argv = ["knowledge", "augment", f"data={data}", f"out={out}", "scorer=file", f"scores={tmp_path / 'scored.jsonl'}"]
    assert cli.main(argv) == 0
    rows = _read(out / "scored.jsonl")
    assert rows[0]["perplexities"][0] is None
    ka, _ = read_records(out / "ka.json", "ka")
    rewritten = [k for k in ka if k.provenance == "rewritten"]
    assert rewritten[0].answer == " ".join(facts[0]["facts"][-2:])  # ceil(0.5 * 3) = 2 facts: the two hardest
    assert rewritten[1].answer == facts[1]["facts"][0]   # a single (None-scored) fact is still kept
    capsys.readouterr()
    assert cli.main([*argv[:4], "scorer=file"]) == 2
    assert "scorer=file needs" in capsys.readouterr().err
    # a row scored without its input (context) is not the question the model scorer would score: refused
    del scored[2]["input"]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    assert cli.main(argv) == 2
    assert "no scored row for question 'Summarise the text.\\nRome" in capsys.readouterr().err


def test_errors_name_the_key_or_file(tmp_path, capsys) -> None:
    assert cli.main(["knowledge", "extract", "out=x"]) == 2
    assert "data and out are required" in capsys.readouterr().err
    assert cli.main(["knowledge", "extract", f"data={tmp_path / 'nope.json'}", f"out={tmp_path}"]) == 2
    assert "nope.json: file does not exist" in capsys.readouterr().err
    assert cli.main(["knowledge", "augment", f"data={tmp_path}", "out=x", "alpha=0"]) == 2
    assert "alpha: must be in (0, 1]" in capsys.readouterr().err
    assert cli.main(["knowledge", "compare", "data=a", "out=b", "backend=gpt"]) == 2
    assert "backend: 'gpt'" in capsys.readouterr().err


def test_switching_backend_names_each_backends_options(data, tmp_path, capsys) -> None:
    argv = ["knowledge", "extract", f"data={data}", f"out={tmp_path / 'run'}", "backend=offline",
            "backend_options.api_key_env=ANTHROPIC_API_KEY", "backend_options.model=claude-sonnet-4-6"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "knowledge backend 'offline' does not take option(s) ['api_key_env', 'model']; offline takes [" in err
    assert "anthropic takes [" in err and "Traceback" not in err


@pytest.mark.slow
def test_model_scorer_end_to_end(data, tmp_path, capsys) -> None:
    from helpers.hf_fixtures import LLAMA2_TINY, make_hf_llama

    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from kt_jax.inference.scoring import fact_perplexities
    from kt_jax.model.hf import load_pretrained

    model_dir = make_hf_llama(tmp_path / "m", seed=5, **{**LLAMA2_TINY, "vocab_size": 320})
    train_bpe_tokenizer([r["instruction"] + " " + r["output"] for r in ROWS] * 20 + [alpaca_prompt("x")] * 5, 320,
                        model_dir)
    out = tmp_path / "run"
    assert cli.main(["knowledge", "augment", f"data={data}", f"out={out}", f"model={model_dir}"]) == 0
    rows = _read(out / "scored.jsonl")
    expect = fact_perplexities(load_pretrained(model_dir), load_tokenizer(model_dir),
                               [(r["question"] if not r["input"] else f"{r['question']}\n{r['input']}", r["facts"])
                                for r in rows], progress=False)
    for r, e in zip(rows, expect, strict=True):
        assert r["perplexities"] == pytest.approx(e, rel=1e-5) and all(math.isfinite(p) for p in e)


def _tiny_model(tmp_path):
    from helpers.hf_fixtures import LLAMA2_TINY, make_hf_llama

    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.data.tokenizer import train_bpe_tokenizer

    model_dir = make_hf_llama(tmp_path / "m", seed=5, **{**LLAMA2_TINY, "vocab_size": 320})
    train_bpe_tokenizer([r["instruction"] + " " + r["output"] for r in ROWS] * 20 + [alpaca_prompt("x")] * 5, 320,
                        model_dir)
    return model_dir


@pytest.mark.slow
def test_model_scorer_runs_on_the_given_mesh_and_dtype_and_reuses_scored_rows(data, tmp_path, monkeypatch) -> None:
    import jax
    from flax import nnx

    import kt_jax.inference.scoring as scoring
    import kt_jax.model.hf as hf
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.knowledge.job import KnowledgeConfig, build_knowledge
    from kt_jax.sharding import make_mesh

    model_dir = _tiny_model(tmp_path)
    loads, calls = [], []
    real_load, real_score = hf.load_pretrained, scoring.fact_perplexities

    def load(path, mesh=None, dtype="float32", **kwargs):
        loads.append((mesh, dtype))
        model = real_load(path, mesh=mesh, dtype=dtype, **kwargs)
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert all(p.sharding.mesh.shape == mesh.shape for p in params)  # loaded straight onto the mesh
        assert any("tensor" in str(p.sharding.spec) for p in params) and model.config.dtype == dtype
        return model

    def score(model, tokenizer, items, **kwargs):
        calls.append((kwargs.get("mesh"), len(items)))
        return real_score(model, tokenizer, items, **kwargs)

    monkeypatch.setattr(hf, "load_pretrained", load)
    monkeypatch.setattr(scoring, "fact_perplexities", score)
    mesh = make_mesh(2, 1, 4)
    out = tmp_path / "run"
    cfg = KnowledgeConfig(data=str(data), out=str(out), model=str(model_dir))
    summary = build_knowledge(cfg, stage="augment", mesh=mesh, dtype="float32", progress=False)
    assert loads == [(mesh, "float32")] and calls == [(mesh, 3)] and summary["stats"]["KA rewritten"] == 3
    rows = _read(out / "scored.jsonl")
    expect = real_score(real_load(model_dir), load_tokenizer(model_dir),
                        [(r["question"] if not r["input"] else f"{r['question']}\n{r['input']}", r["facts"])
                         for r in rows], progress=False)
    for r, e in zip(rows, expect, strict=True):  # sharded scoring gives the single-device numbers
        assert r["perplexities"] == pytest.approx(e, rel=1e-5)
    assert json.loads((out / "scored.meta.json").read_text())["stamp"]["dtype"] == "float32"
    build_knowledge(cfg, stage="augment", mesh=mesh, dtype="float32", progress=False)
    assert len(loads) == 1  # same facts, scorer and dtype: the perplexities are reused, no model is loaded
    lines = (out / "scored.jsonl").read_text().splitlines()
    (out / "scored.jsonl").write_text(lines[0] + "\n" + lines[1][:9])  # killed while writing row 2
    build_knowledge(cfg, stage="augment", mesh=mesh, dtype="float32", progress=False)
    assert calls[-1] == (mesh, 3) and _read(out / "scored.jsonl") == rows  # rescored in one call: the same bits
    build_knowledge(cfg, stage="augment", mesh=mesh, dtype="bfloat16", progress=False)
    assert loads[-1] == (mesh, "bfloat16") and calls[-1] == (mesh, 3)  # another dtype: every row is rescored
    bf16 = _read(out / "scored.jsonl")
    assert [r["id"] for r in bf16] == [r["id"] for r in rows] and bf16 != rows


def test_command_passes_mesh_and_dtype_to_the_library(data, tmp_path, capsys, monkeypatch) -> None:
    import kt_jax.commands.knowledge as command

    seen = []

    def fake(cfg, *, stage, mesh, dtype):
        seen.append((cfg, stage, None if mesh is None else dict(mesh.shape), dtype))
        return {"stage": stage, "out": cfg.out, "seconds": 0.0, "stats": {"rows": 3}, "backend": "offline: 0 calls"}

    monkeypatch.setattr(command, "build_knowledge", fake)
    base = ["knowledge", "augment", f"data={data}", f"out={tmp_path}", "alpha=0.3"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--dtype", "bfloat16", "--mesh-data", "2", "--mesh-tensor", "4"]) == 0
    assert [s[1:] for s in seen] == [("augment", None, "float32"),  # no --mesh-*: one device, as before
                                     ("augment", {"data": 2, "fsdp": 1, "tensor": 4}, "bfloat16")]
    assert seen[0][0].alpha == 0.3 and seen[0][0].data == str(data)
    assert "rows: 3" in capsys.readouterr().out
