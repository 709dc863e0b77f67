"""Records: alpaca / ranking / HF-dataset readers and writers, validation errors, row policies, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kt_jax.data.records import (
    KARecord,
    KCRecord,
    QARecord,
    RecordPolicy,
    read_records,
    read_rows,
    write_records,
)
from kt_jax.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "knowtuning"
QA = [QARecord("What is X?", "X is a letter."), QARecord("Summarise.", "Short.", "Zürich — 東京\nline 2")]
KA = [KARecord("What is X?", "X is a letter."),
      KARecord("Which letter is X?", "The 24th.", provenance="rewritten", source_question="What is X?")]
KC = [KCRecord("What is X?", "X is a letter.", "X is a number.", "factuality", ref_chosen_logp=-3.5,
               ref_rejected_logp=-7.25),
      KCRecord("What is X?", "X is a letter, the 24th.", "X is a letter.", "completeness")]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize(("kind", "records"), [("qa", QA), ("ka", KA), ("kc", KC)])
def test_round_trip(tmp_path: Path, suffix: str, kind: str, records: list) -> None:
    path = write_records(tmp_path / f"r{suffix}", records)
    back, report = read_records(path, kind)
    assert back == records and report.kept == report.rows == len(records)


def test_formats_are_llamafactory_compatible(tmp_path: Path) -> None:
    write_records(tmp_path / "kc.json", KC[:1])
    write_records(tmp_path / "qa.jsonl", QA[1:])
    assert json.loads((tmp_path / "kc.json").read_text()) == [{
        "instruction": "What is X?", "input": "", "output": ["X is a letter.", "X is a number."],
        "aspect": "factuality", "ref_chosen_logp": -3.5, "ref_rejected_logp": -7.25}]
    line = (tmp_path / "qa.jsonl").read_text(encoding="utf-8")
    assert "Zürich" in line and json.loads(line) == {"instruction": "Summarise.", "input": "Zürich — 東京\nline 2",
                                                     "output": "Short."}


def test_hf_dataset_dir(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": r.question, "input": r.input, "output": r.answer} for r in QA]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    back, _ = read_records(tmp_path / "ds", "qa")
    assert back == QA


@pytest.mark.parametrize(("row", "kind", "message"), [
    ({"input": "", "output": "a"}, "qa", "row 1: field 'instruction': expected a string, got missing"),
    ({"instruction": "q", "output": 3}, "qa", "row 1: field 'output': expected a string, got int"),
    ({"instruction": "q", "output": "a"}, "kc", "row 1: field 'output': expected [chosen, rejected]"),
    ({"instruction": "q", "output": ["a", "b"], "ref_chosen_logp": "x"}, "kc", "row 1: field 'ref_chosen_logp'"),
    ({"instruction": "q", "output": "a", "provenance": "made up"}, "ka", "row 1: field 'provenance'"),
    ({"instruction": " ", "output": "a"}, "qa", "row 1: field 'instruction': empty question"),
    ("not an object", "qa", "row 1: expected an object"),
])
def test_errors_name_file_row_field(tmp_path: Path, row, kind: str, message: str) -> None:
    path = tmp_path / "bad.json"
    good = {"instruction": "ok", "input": "", "output": ["a", "b"] if kind == "kc" else "a"}
    path.write_text(json.dumps([good, row]))
    with pytest.raises(DataError) as err:
        read_records(path, kind)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"instruction": 1}')
    (tmp_path / "b.jsonl").write_text('{"instruction": "q", "output": "a"}\n{oops\n')
    with pytest.raises(DataError, match="expected a JSON array"):
        read_rows(tmp_path / "a.json")
    with pytest.raises(DataError, match=r"b\.jsonl: line 2: invalid JSON"):
        read_rows(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.json")
    with pytest.raises(DataError, match="not a saved HF dataset"):
        read_rows(tmp_path)


def test_empty_and_duplicate_policies(tmp_path: Path) -> None:
    rows = [{"instruction": "q1", "output": "a"}, {"instruction": "q2", "output": "  "},
            {"instruction": "q1", "output": "a"}, {"instruction": "q1", "output": "b"}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"row 1: field 'output': empty answer"):
        read_records(path)
    recs, rep = read_records(path, policy=RecordPolicy(empty_answer="skip"))
    assert [r.answer for r in recs] == ["a", "a", "b"]
    assert (rep.rows, rep.kept, rep.skipped_empty, rep.duplicates_kept) == (4, 3, 1, 1)
    recs, rep = read_records(path, policy=RecordPolicy(empty_answer="skip", duplicate="skip"))
    assert [r.answer for r in recs] == ["a", "b"] and rep.skipped_duplicate == 1
    assert "skipped 1 empty-answer and 1 duplicate" in rep.summary()
    recs, rep = read_records(path, policy=RecordPolicy(empty_answer="skip", duplicate="skip", duplicate_key="question"))
    assert [r.answer for r in recs] == ["a"] and rep.skipped_duplicate == 2
    with pytest.raises(DataError, match="row 2: field 'instruction': duplicate of row 0"):
        read_records(path, policy=RecordPolicy(empty_answer="skip", duplicate="error"))
    kc = tmp_path / "kc.json"
    kc.write_text(json.dumps([{"instruction": "q", "output": ["a", ""]}]))
    with pytest.raises(DataError, match=r"field 'output\[1\] \(rejected\)': empty answer"):
        read_records(kc, "kc")


@pytest.mark.skipif(not REAL.is_dir(), reason="shared/data/knowtuning is absent (a user's checkout)")
@pytest.mark.parametrize("name", ["dolly_train.json", "dolly_valid.json", "medquad_train_v1.json",
                                  "medquad_valid.json"])
def test_real_files_load_and_round_trip(tmp_path: Path, name: str) -> None:
    rows = json.loads((REAL / name).read_text(encoding="utf-8"))
    recs, rep = read_records(REAL / name, "qa")
    assert rep.kept == rep.rows == len(rows) and rep.skipped_empty == rep.skipped_duplicate == 0
    unique = len({(r["instruction"], r["input"]) for r in rows})
    dedup, rep2 = read_records(REAL / name, "qa", RecordPolicy(duplicate="skip", duplicate_key="question"))
    assert len(dedup) == unique and rep2.skipped_duplicate == len(rows) - unique
    for suffix in (".json", ".jsonl"):
        out = write_records(tmp_path / f"out{suffix}", recs)
        assert read_rows(out) == [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
                                  for r in rows]
        assert read_records(out, "qa")[0] == recs
