"""kt_jax.data.resumable: resume count, torn last line, rows that do not match their input, stamp changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kt_jax.data.resumable import ResumableJsonl, differing_keys
from kt_jax.errors import ConfigError, DataError

INPUTS = [{"id": i, "question": f"q{i}", "facts": ["a"] * i} for i in range(5)]
STAMP = {"model": "m", "max_len": 64, "sampling": (0.95, 50)}


def _out(row: dict) -> dict:
    return {**row, "ppl": [1.0] * len(row["facts"])}


def _writer(path: Path, **kwargs) -> ResumableJsonl:
    return ResumableJsonl(path, stamp=kwargs.pop("stamp", STAMP), what="scored rows", **kwargs)


def test_resume_count_and_append(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    w = _writer(path)
    assert w.done(INPUTS, "question") == 0 and path.exists() and path.read_text() == ""
    w.append(_out(r) for r in INPUTS[:2])
    w.append([])
    assert w.count == 2
    again = _writer(path)
    assert again.done(INPUTS, ("id", "question")) == 2
    again.append(_out(r) for r in INPUTS[2:])
    assert again.rows() == [_out(r) for r in INPUTS] and again.count == 5
    assert _writer(path).done(INPUTS, lambda r: r["question"]) == 5
    stored = json.loads((tmp_path / "sub" / "out.jsonl.stamp.json").read_text())
    assert stored == {"what": "scored rows", "stamp": {"model": "m", "max_len": 64, "sampling": [0.95, 50]},
                      "info": {}}


def test_torn_last_line_is_dropped_and_the_file_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    w = _writer(path)
    w.done(INPUTS, "question")
    w.append(_out(r) for r in INPUTS[:3])
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:7])  # killed while writing row 3
    again = _writer(path)
    assert again.done(INPUTS, "question") == 2
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    again.append(_out(r) for r in INPUTS[2:])
    assert [r["id"] for r in again.rows()] == [0, 1, 2, 3, 4]


def test_a_row_that_does_not_match_its_input_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    w = _writer(path)
    w.done(INPUTS, "question")
    w.append(_out(r) for r in INPUTS[:3])
    other = [INPUTS[0], {**INPUTS[1], "question": "changed"}, *INPUTS[2:]]
    with pytest.raises(DataError, match=r"out\.jsonl: line 2: does not match input row 2"):
        _writer(path).done(other, "question")
    with pytest.raises(DataError, match="line 3: does not match input row 3"):
        _writer(path).done(INPUTS[:2], "question")  # more rows written than there are inputs
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match="line 4: invalid JSON"):
        _writer(path).done(INPUTS, "question")


def test_a_different_stamp_with_rows_is_refused_naming_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    w = _writer(path, info={"mesh": [1, 8, 1]})
    w.done(INPUTS, "question")
    assert _writer(path, info={"mesh": [2, 4, 1]}).done(INPUTS, "question") == 0  # info is never compared
    w.append([_out(INPUTS[0])])
    changed = {**STAMP, "max_len": 32, "dtype": "bfloat16"}
    with pytest.raises(ConfigError, match=r"out\.jsonl\.stamp\.json: .*different config \(differs in dtype, "
                                          r"max_len\)"):
        _writer(path, stamp=changed).done(INPUTS, "question")
    assert len(_writer(path).rows()) == 1  # nothing was touched
    (tmp_path / "out.jsonl.stamp.json").unlink()
    with pytest.raises(ConfigError, match="missing or unreadable"):
        _writer(path).done(INPUTS, "question")


def test_restart_discards_rows_of_another_stamp_and_stamp_path_is_settable(tmp_path: Path) -> None:
    path, meta = tmp_path / "scored.jsonl", tmp_path / "scored.meta.json"
    w = _writer(path, stamp_path=meta, restart=True)
    w.done(INPUTS, "question")
    w.append(_out(r) for r in INPUTS)
    assert meta.exists() and not (tmp_path / "scored.jsonl.stamp.json").exists()
    assert _writer(path, stamp_path=meta, restart=True).done(INPUTS, "question") == 5
    fresh = _writer(path, stamp={**STAMP, "model": "other"}, stamp_path=meta, restart=True)
    assert fresh.done(INPUTS, "question") == 0 and fresh.rows() == []
    assert json.loads(meta.read_text())["stamp"]["model"] == "other"


def test_ascii_and_unicode_output(tmp_path: Path) -> None:
    for ensure_ascii, expect in ((False, '{"q": "Zürich"}\n'), (True, '{"q": "Z\\u00fcrich"}\n')):
        path = tmp_path / f"{ensure_ascii}.jsonl"
        w = ResumableJsonl(path, stamp={}, what="rows", ensure_ascii=ensure_ascii)
        w.done([], "q")
        w.append([{"q": "Zürich"}])
        assert path.read_text(encoding="utf-8") == expect
    with pytest.raises(RuntimeError, match="done"):
        ResumableJsonl(tmp_path / "x.jsonl", stamp={}, what="rows").append([{}])
    assert differing_keys({"a": 1, "b": 2}, {"a": 1, "c": 3}) == ["b", "c"]


def test_reset_discards_rows_and_keeps_the_stamp(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    w = _writer(path)
    w.done(INPUTS, "question")
    w.append(_out(r) for r in INPUTS[:2])
    w.reset()
    assert w.count == 0 and w.rows() == [] and (tmp_path / "out.jsonl.stamp.json").exists()
    w.append([_out(INPUTS[0])])
    assert _writer(path).done(INPUTS, "question") == 1
