"""Fact perplexities vs HF PyTorch per (prompt, fact); identical across packing, batch size, order and meshes."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

import numpy as np
import pytest

from kt_jax.data.packing import bucket_length
from kt_jax.data.templates import alpaca_prompt, encode_pair
from kt_jax.inference.scoring import MIN_BUCKET, fact_perplexities, score_facts, sequence_logprobs
from kt_jax.model.hf import load_pretrained

# Built against HF PyTorch: skipped where torch is not installed (the Python 3.12 CI run).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class ByteTokenizer:
    """UTF-8 bytes as ids 3..255 (wrapped), BOS 1, EOS 2, PAD 0: fits the 256-token test checkpoints."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 256

    def encode(self, text: str) -> list[int]:
        return [3 + b % 253 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 3 for i in ids if i > 2).decode("utf-8", "replace")


TOK = ByteTokenizer()
ITEMS = [
    ("What is the capital of France?", ["Paris is the capital.", "It lies on the Seine.", "x"]),
    ("Name a prime.", ["Seven is prime.", "Two is the only even prime number, and it is the smallest prime."]),
    ("Où est Zürich? 東京は？", ["Zürich liegt in der Schweiz.", "東京は日本の首都です。", "Ünïcödé ✓ — ok"]),
    ("No facts here.", []),
    ("Short", ["A.", "B c.", "Bananas are berries; strawberries are not.", "Water boils at 100 °C at sea level."]),
]
MAX_LEN = 256


def _hf_fact_scores(path, items, max_len: int = MAX_LEN, add_eos: bool = False) -> list[list[tuple[float, int]]]:
    """(summed log-prob, tokens) of each fact, scoring each (prompt, fact) alone with HF LlamaForCausalLM."""
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for question, facts in items:
        row = []
        for fact in facts:
            enc = encode_pair(TOK, alpaca_prompt(question), fact, max_len, add_eos=add_eos)
            ids = enc.prompt_ids + enc.response_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            p = len(enc.prompt_ids)
            total = sum(float(logp[t - 1, ids[t]]) for t in range(p, len(ids)))
            row.append((total, len(ids) - p))
        out.append(row)
    return out


def _ppl(total: float, n: int) -> float:
    return math.exp(-total / n) if n else math.nan


@pytest.fixture(scope="module")
def llama3_model(llama3_dir):
    return load_pretrained(llama3_dir)


@pytest.fixture(scope="module")
def reference(llama3_model) -> list[list[float]]:
    """kt-jax, one pair per row, one row per call: the baseline every other layout must reproduce."""
    return fact_perplexities(llama3_model, TOK, ITEMS, max_len=MAX_LEN, packing="padded", batch_size=1,
                             progress=False)


def _assert_same(got: list[list[float]], ref: list[list[float]], rtol: float) -> None:
    assert [len(r) for r in got] == [len(r) for r in ref]
    np.testing.assert_allclose(np.concatenate([np.array(r, float) for r in got if r]),
                               np.concatenate([np.array(r, float) for r in ref if r]), rtol=rtol, atol=0)


@pytest.mark.parametrize("which", ["llama2_dir", "llama3_dir"])
def test_fact_perplexities_match_hf_each_pair_alone(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    got = fact_perplexities(load_pretrained(path), TOK, ITEMS, max_len=MAX_LEN, batch_size=4, progress=False)
    ref = [[_ppl(*s) for s in row] for row in _hf_fact_scores(path, ITEMS)]
    assert got[3] == []
    flat = np.concatenate([np.array(r) for r in ref if r])
    assert flat.max() / flat.min() > 1.5, "perplexities too uniform for the comparison to mean anything"
    _assert_same(got, ref, rtol=1e-4)


@pytest.mark.parametrize(("packing", "batch_size"), [
    ("padded", 64), ("packed", 1), ("packed", 7), ("shared", 1), ("shared", 7), ("shared", 64)])
def test_identical_for_every_packing_and_batch_size(llama3_model, reference, packing: str, batch_size: int) -> None:
    got = fact_perplexities(llama3_model, TOK, ITEMS, max_len=MAX_LEN, packing=packing, batch_size=batch_size,
                            progress=False)
    _assert_same(got, reference, rtol=1e-6)


def test_identical_for_any_order_and_tight_packing_limits(llama3_model, reference) -> None:
    order = list(range(len(ITEMS)))
    random.Random(0).shuffle(order)
    shuffled = [(ITEMS[i][0], list(reversed(ITEMS[i][1]))) for i in order]
    got = fact_perplexities(llama3_model, TOK, shuffled, max_len=MAX_LEN, batch_size=3, pack_len=200,
                            max_segments=2, progress=False)
    back = [None] * len(ITEMS)
    for j, i in enumerate(order):
        back[i] = list(reversed(got[j]))
    _assert_same(back, reference, rtol=1e-6)


def test_identical_on_every_mesh(llama3_dir, reference, mesh) -> None:
    model = load_pretrained(llama3_dir, mesh=mesh)
    for packing, batch_size in (("shared", 8), ("packed", 7), ("padded", 64)):  # 7 rounds up to the batch ways
        got = fact_perplexities(model, TOK, ITEMS, max_len=MAX_LEN, mesh=mesh, packing=packing,
                                batch_size=batch_size, progress=False)
        _assert_same(got, reference, rtol=1e-6)


def test_edge_cases(llama3_model, llama3_dir) -> None:
    question = "Q?"
    prompt_len = 1 + len(TOK.encode(alpaca_prompt(question)))
    max_len = prompt_len + 10
    long_fact = "This fact is much longer than ten tokens."
    items = [(question, []), (question, ["", long_fact, "fits"]), ("q" * max_len, ["anything"])]
    scores = score_facts(llama3_model, TOK, items, max_len=max_len, progress=False)
    assert scores[0] == []
    empty, long, fits = scores[1]
    assert empty.n_tokens == 0 and math.isnan(empty.ppl) and not empty.truncated
    assert long.truncated and long.n_tokens == 10
    assert not fits.truncated and fits.n_tokens == len("fits")
    hf = _hf_fact_scores(llama3_dir, [(question, [long_fact, "fits"])], max_len=max_len)[0]
    assert hf[0][1] == 10  # HF scored the same 10 kept tokens
    np.testing.assert_allclose([long.ppl, fits.ppl], [_ppl(*s) for s in hf], rtol=1e-4)
    (no_room,) = scores[2]
    assert no_room.truncated and no_room.n_tokens == 0 and math.isnan(no_room.ppl)
    assert fact_perplexities(llama3_model, TOK, [], progress=False) == []


def test_sequence_logprobs_match_hf_with_eos(llama3_model, llama3_dir) -> None:
    items = [("Name a prime.", ["Seven.", "Two is the only even prime."]), ("Where?", ["Zürich."])]
    pairs = [(alpaca_prompt(q), f) for q, facts in items for f in facts]
    got = sequence_logprobs(llama3_model, TOK, pairs, max_len=MAX_LEN)
    ref = [s for row in _hf_fact_scores(llama3_dir, items, add_eos=True) for s in row]
    assert [n for _, n in got] == [n for _, n in ref] == [len(f.encode()) + 1 for _, f in pairs]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in ref], rtol=1e-4)


def test_buckets_are_a_small_fixed_set() -> None:
    lengths = lambda max_len: sorted({bucket_length(n, max_len, smallest=MIN_BUCKET) for n in range(1, max_len + 1)})
    assert lengths(1024) == [32, 64, 128, 256, 512, 1024]
    assert lengths(300) == [32, 64, 128, 256, 300]


FACT_ROWS = [
    {"id": "a", "question": "What is the capital of France?", "facts": ["Paris is the capital.", ""]},
    {"id": "b", "question": "Name a prime.", "facts": ["Seven is prime."], "extra": {"keep": [1, 2]}},
    {"id": "c", "question": "Nothing?", "facts": []},
    {"id": "d", "question": "Où?", "input": "Zürich context.", "facts": ["À Zürich.", "Near the lake."]},
]


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    from helpers.hf_fixtures import LLAMA2_TINY, make_hf_llama

    from kt_jax.data.tokenizer import train_bpe_tokenizer

    path = make_hf_llama(tmp_path_factory.mktemp("bpe"), seed=5, **{**LLAMA2_TINY, "vocab_size": 320})
    texts = [r["question"] + " " + " ".join(r["facts"]) for r in FACT_ROWS] * 20 + [alpaca_prompt("x")] * 5
    train_bpe_tokenizer(texts, 320, path)
    return path


def test_score_command_writes_ppl_and_resumes(bpe_model_dir, tmp_path, capsys) -> None:
    import json

    from kt_jax import cli
    from kt_jax.data.tokenizer import load_tokenizer

    src, out = tmp_path / "facts.jsonl", tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in FACT_ROWS), encoding="utf-8")
    argv = ["score", "--model", str(bpe_model_dir), "--input", str(src), "--output", str(out), "--chunk", "2"]
    assert cli.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"] and rows[1]["extra"] == {"keep": [1, 2]}
    assert rows[0]["ppl"][1] is None and rows[0]["ppl_tokens"][1] == 0 and rows[2]["ppl"] == []
    expected = fact_perplexities(load_pretrained(bpe_model_dir), load_tokenizer(bpe_model_dir),
                                 [(r["question"] + ("\n" + r["input"] if "input" in r else ""), r["facts"])
                                  for r in FACT_ROWS], packing="padded", progress=False)
    got = [[math.nan if p is None else p for p in r["ppl"]] for r in rows]
    _assert_same(got, expected, rtol=1e-6)
    # a crash after row 1 plus a torn line: the re-run drops the torn line and writes rows 2..4 only
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    out.write_text(lines[0] + "\n" + lines[1][:10], encoding="utf-8")
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "1 rows already scored, 3 to go" in capsys.readouterr().out
    again = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(again) == 4 and again[0] == rows[0] and [r["id"] for r in again] == ["a", "b", "c", "d"]
    _assert_same([[math.nan if p is None else p for p in r["ppl"]] for r in again], expected, rtol=1e-6)
    assert cli.main([*argv, "--max-len", "64"]) == 2  # another config: refused


def test_score_command_errors_name_file_line_and_field(bpe_model_dir, tmp_path, capsys) -> None:
    from kt_jax import cli

    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "q", "facts": ["ok"]}\n{"question": "q2", "facts": "not a list"}\n')
    assert cli.main(["score", "--model", str(bpe_model_dir), "--input", str(src), "--output",
                     str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "line 2" in err and "'facts'" in err


def test_score_file_library_call_on_a_mesh_matches_the_command(bpe_model_dir, tmp_path, capsys) -> None:
    import json

    from kt_jax import cli
    from kt_jax.errors import ConfigError
    from kt_jax.inference.score_file import ScoreConfig, score_file
    from kt_jax.sharding import make_mesh

    src = tmp_path / "facts.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in FACT_ROWS), encoding="utf-8")
    assert cli.main(["score", "--model", str(bpe_model_dir), "--input", str(src), "--output",
                     str(tmp_path / "cli.jsonl")]) == 0  # the default mesh: fsdp over every device
    cfg = ScoreConfig(model=str(bpe_model_dir), input=str(src), output=str(tmp_path / "lib.jsonl"), packing="packed")
    summary = score_file(cfg, mesh=make_mesh(2, 1, 4), progress=False)
    assert summary["rows"] == 4 and summary["new"] == 4 and summary["already"] == 0 and summary["empty"] == 1
    assert capsys.readouterr().out.count("to go") == 1  # the command prints progress, the quiet library call not
    cli_rows, lib_rows = ([json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text(encoding="utf-8").splitlines()]
                          for n in ("cli", "lib"))
    assert [r["ppl_tokens"] for r in lib_rows] == [r["ppl_tokens"] for r in cli_rows]
    _assert_same([[math.nan if p is None else p for p in r["ppl"]] for r in lib_rows],
                 [[math.nan if p is None else p for p in r["ppl"]] for r in cli_rows], rtol=1e-6)
    stamp = json.loads((tmp_path / "lib.config.json").read_text())
    assert stamp["stamp"]["max_len"] == 1024 and stamp["info"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert score_file(cfg, mesh=None, progress=False)["new"] == 0  # the mesh and packing never change the rows
    with pytest.raises(ConfigError, match=r"lib\.config\.json: .*differs in dtype, max_len"):
        score_file(dataclasses.replace(cfg, max_len=64, dtype="bfloat16"), mesh=None, progress=False)
    with pytest.raises(ConfigError, match="packing: 'tight'"):
        score_file(dataclasses.replace(cfg, packing="tight"), mesh=None)


def test_unrolled_blocks_match_the_scanned_blocks(llama3_dir, reference, monkeypatch) -> None:
    """Small models score with their blocks stacked and scanned (`scoring.SCAN_MAX_BYTES`); larger ones unrolled.
    Both give the one-pair-per-row numbers; blocks of different structure are never stacked."""
    import kt_jax.inference.scoring as scoring
    from kt_jax.model.llama import stack_blocks
    from kt_jax.model.lora import LoRAConfig, apply_lora

    model = load_pretrained(llama3_dir)
    assert set(scoring._split(model)[2]) == {"block_graphdef", "stacked"}
    monkeypatch.setattr(scoring, "SCAN_MAX_BYTES", -1)
    assert scoring._split(model)[2] == {}
    got = fact_perplexities(model, TOK, ITEMS, max_len=MAX_LEN, batch_size=3, progress=False)
    _assert_same(got, reference, rtol=1e-6)
    adapted = apply_lora(load_pretrained(llama3_dir), LoRAConfig())
    assert stack_blocks([adapted.layers[0], model.layers[1]]) is None
    assert stack_blocks(adapted.layers) is not None
