"""Typed QA / KA / KC records and their readers and writers (alpaca JSON/JSONL, LLaMA-Factory ranking, HF datasets).

File formats (compatible with the original KnowTuning release and LLaMA-Factory 0.5.3):
- QA / KA: alpaca rows `{"instruction": question, "input": "", "output": answer}`; KA rows may add
  `"provenance": "original" | "rewritten"` and `"source_question"` (LLaMA-Factory ignores extra keys).
- KC: ranking rows `{"instruction", "input", "output": [chosen, rejected]}` plus optional `"aspect"`,
  `"ref_chosen_logp"`, `"ref_rejected_logp"` (summed response log-probs of the reference model).
Files: `.json` (array), `.jsonl`, `.parquet`, or a directory saved with `datasets.Dataset.save_to_disk`.

Row policy (`RecordPolicy`): an empty answer (or empty chosen/rejected) and a duplicate row are either an error
(DataError naming file, row and field) or skipped; duplicates may also be kept. Every skip is counted in the
`LoadReport`, so nothing disappears silently. Over-length rows are handled where lengths are known (the pipeline).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kt_jax.errors import DataError

Policy = Literal["error", "skip"]
DuplicatePolicy = Literal["error", "skip", "keep"]
Provenance = Literal["original", "rewritten"]


@dataclass(frozen=True)
class QARecord:
    """A question/answer pair (alpaca `instruction` [+ `input`] -> `output`)."""

    question: str
    answer: str
    input: str = ""


@dataclass(frozen=True)
class KARecord:
    """A knowledge-aware SFT pair: an original QA pair or a fine-grained rewritten one (with its source question)."""

    question: str
    answer: str
    input: str = ""
    provenance: Provenance = "original"
    source_question: str | None = None


@dataclass(frozen=True)
class KCRecord:
    """A knowledge-comparison preference pair for one question; reference log-probs are filled once scored."""

    question: str
    chosen: str
    rejected: str
    aspect: str = ""
    input: str = ""
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


Record = QARecord | KARecord | KCRecord
KINDS = ("qa", "ka", "kc")


@dataclass(frozen=True)
class RecordPolicy:
    """What to do with empty answers and duplicates.

    `duplicate_key`: "row" = same question, input and answer(s); "question" = same question and input (for KC
    pairs also the same aspect). Dolly train has 105 repeated questions, 7 of them fully repeated rows.
    """

    empty_answer: Policy = "error"
    duplicate: DuplicatePolicy = "keep"
    duplicate_key: Literal["row", "question"] = "row"


@dataclass
class LoadReport:
    """Counts of what a reader did with a file's rows."""

    path: str
    rows: int = 0
    kept: int = 0
    skipped_empty: int = 0
    skipped_duplicate: int = 0
    duplicates_kept: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: rows read, kept, skipped (by reason)."""
        return (f"{self.path}: {self.rows} rows, kept {self.kept}, skipped {self.skipped_empty} empty-answer and "
                f"{self.skipped_duplicate} duplicate rows ({self.duplicates_kept} duplicates kept)")


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The raw rows of a `.json` array, `.jsonl`, `.parquet` file or a `save_to_disk` dataset directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if path.is_dir():
        if not _is_dataset_dir(path):
            raise DataError(f"{path}: directory is not a saved HF dataset (no dataset_info.json/state.json)")
        import datasets

        return [dict(r) for r in datasets.load_from_disk(str(path))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {i + 1}: invalid JSON ({exc.msg})") from exc
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    return data


def _str_field(row: Any, key: str, where: str, required: bool = True) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in row else type(value).__name__
        raise DataError(f"{where}: field '{key}': expected a string, got {got}")
    return value


def check_fields(row: Any, where: str, *, strings: Sequence[str] = (), non_empty: Sequence[str] = (),
                 optional: Sequence[str] = (), string_lists: Sequence[str] = ()) -> dict[str, Any]:
    """`row` when it is an object whose fields have these types; else a DataError naming `where` and the field.

    strings: required strings; non_empty: required non-blank strings; optional: strings when present;
    string_lists: required lists of strings.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for key in (*strings, *optional):
        _str_field(row, key, where, required=key not in optional)
    for key in non_empty:
        if not _str_field(row, key, where).strip():
            raise DataError(f"{where}: field '{key}': expected a non-empty string, got {row[key]!r:.60}")
    for key in string_lists:
        value = row.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field '{key}': expected a list of strings, got {value!r:.60}")
    return row


def _float_field(row: dict[str, Any], key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{key}': expected a finite number, got {value!r}")
    return float(value)


def parse_row(row: Any, kind: str, where: str) -> Record:
    """One record of `kind` ('qa' | 'ka' | 'kc') from a raw row; `where` names file and row in errors."""
    question = _str_field(row, "instruction", where)
    if not question.strip():
        raise DataError(f"{where}: field 'instruction': empty question")
    inp = _str_field(row, "input", where, required=False)
    if kind == "kc":
        out = row.get("output")
        if not (isinstance(out, list) and len(out) == 2 and all(isinstance(x, str) for x in out)):
            raise DataError(f"{where}: field 'output': expected [chosen, rejected] (two strings), got {out!r:.80}")
        return KCRecord(question, out[0], out[1], _str_field(row, "aspect", where, required=False), inp,
                        _float_field(row, "ref_chosen_logp", where), _float_field(row, "ref_rejected_logp", where))
    answer = _str_field(row, "output", where)
    if kind == "qa":
        return QARecord(question, answer, inp)
    if kind == "ka":
        prov = row.get("provenance", "original")
        if prov not in ("original", "rewritten"):
            raise DataError(f"{where}: field 'provenance': expected 'original' or 'rewritten', got {prov!r}")
        source = row.get("source_question")
        if source is not None and not isinstance(source, str):
            raise DataError(f"{where}: field 'source_question': expected a string, got {type(source).__name__}")
        return KARecord(question, answer, inp, prov, source)
    raise DataError(f"{where}: unknown record kind {kind!r} (choose from {KINDS})")


def _answers(rec: Record) -> dict[str, str]:
    if isinstance(rec, KCRecord):
        return {"output[0] (chosen)": rec.chosen, "output[1] (rejected)": rec.rejected}
    return {"output": rec.answer}


def _dedup_key(rec: Record, by: str) -> tuple[str, ...]:
    if by == "question":
        return (rec.question, rec.input, rec.aspect) if isinstance(rec, KCRecord) else (rec.question, rec.input)
    return (rec.question, rec.input, *_answers(rec).values())


def apply_policy(records: Sequence[Record], wheres: Sequence[str], policy: RecordPolicy,
                 report: LoadReport) -> list[Record]:
    """Apply the empty-answer and duplicate policies, counting every skipped or kept row in `report`."""
    if policy.empty_answer not in ("error", "skip") or policy.duplicate not in ("error", "skip", "keep") or (
            policy.duplicate_key not in ("row", "question")):
        raise DataError(f"{report.path}: invalid record policy {policy}")
    kept: list[Record] = []
    seen: dict[tuple[str, ...], str] = {}
    for rec, where in zip(records, wheres, strict=True):
        empty = [name for name, text in _answers(rec).items() if not text.strip()]
        if empty:
            if policy.empty_answer == "error":
                raise DataError(f"{where}: field '{empty[0]}': empty answer (policy empty_answer=error)")
            report.skipped_empty += 1
            continue
        key = _dedup_key(rec, policy.duplicate_key)
        if key in seen:
            if policy.duplicate == "error":
                raise DataError(f"{where}: field 'instruction': duplicate of {seen[key]} (policy duplicate=error)")
            if policy.duplicate == "skip":
                report.skipped_duplicate += 1
                continue
            report.duplicates_kept += 1
        else:
            seen[key] = where.rsplit(": ", 1)[-1]
        kept.append(rec)
    report.kept = len(kept)
    return kept


def read_records(path: str | Path, kind: str = "qa", policy: RecordPolicy | None = None
                 ) -> tuple[list[Record], LoadReport]:
    """Read and validate all records of a file (see module doc for formats); returns (records, report)."""
    if kind not in KINDS:
        raise DataError(f"{path}: unknown record kind {kind!r} (choose from {KINDS})")
    rows = read_rows(path)
    report = LoadReport(str(path), rows=len(rows))
    wheres = [f"{path}: row {i}" for i in range(len(rows))]
    records = [parse_row(row, kind, where) for row, where in zip(rows, wheres, strict=True)]
    return apply_policy(records, wheres, policy or RecordPolicy(), report), report


def to_row(rec: Record) -> dict[str, Any]:
    """The alpaca / ranking row of a record (inverse of `parse_row`)."""
    row: dict[str, Any] = {"instruction": rec.question, "input": rec.input}
    if isinstance(rec, KCRecord):
        row["output"] = [rec.chosen, rec.rejected]
        if rec.aspect:
            row["aspect"] = rec.aspect
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            if getattr(rec, key) is not None:
                row[key] = getattr(rec, key)
        return row
    row["output"] = rec.answer
    if isinstance(rec, KARecord):
        row["provenance"] = rec.provenance
        if rec.source_question is not None:
            row["source_question"] = rec.source_question
    return row


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as a `.json` array (UTF-8, indented), `.jsonl` or `.parquet` according to the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ in optional keys
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), tmp)
    elif path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a killed run never leaves half a file
    return path


def write_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write records in the alpaca / LLaMA-Factory ranking format (by file suffix, see `write_rows`)."""
    return write_rows(path, (to_row(r) for r in records))
