"""Score a facts file: the perplexity of every fact given its question, written to a resumable JSONL.

Input rows `{"question": str, "facts": [str, ...], ...}` (JSON lines; extra fields are kept), e.g. the facts.jsonl
of `kt-jax knowledge`. A non-empty `input` field (alpaca context) joins the question on its own line, exactly as the
alpaca template builds the training prompt from instruction + input. Each output row is the input row plus `ppl`
(one float per fact; null when the fact has no token), `ppl_tokens` (scored tokens per fact) and `ppl_truncated`
(the fact was cut to fit max_len). A re-run appends only the rows not yet written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from kt_jax.data.resumable import ResumableJsonl
from kt_jax.errors import ConfigError, DataError
from kt_jax.inference.scoring import DEFAULT_BATCH, DEFAULT_PACK_LEN

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Settings of a fact-scoring pass (`kt-jax score`)."""

    model: str = ""                      # HF Llama directory (the model being tuned); required
    input: str = ""                      # facts.jsonl: rows with 'question' and 'facts'; required
    output: str = ""                     # scored.jsonl (its config goes to <stem>.config.json); required
    tokenizer: str = ""                  # tokenizer path ("" = the model directory)
    template: str = "alpaca"             # alpaca | raw: the prompt built from the question
    style: str = "llamafactory-0.5.3"    # alpaca template style
    max_len: int = 1024                  # prompt + fact token limit (longer facts are cut)
    add_bos: bool = True                 # BOS before the prompt (as the training data's add_bos)
    packing: str = "shared"              # shared (prompt once per question) | packed | padded
    batch_size: int = DEFAULT_BATCH      # rows per jitted call (rounded up to the mesh's batch ways)
    pack_len: int = DEFAULT_PACK_LEN     # tokens packed per row
    chunk: int = 256                     # input rows scored per write (the resume granularity)
    dtype: str = "float32"               # compute dtype: float32 | bfloat16

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        if self.template not in ("alpaca", "raw"):
            raise ConfigError(f"template: {self.template!r} is not one of alpaca, raw")
        if self.packing not in ("shared", "packed", "padded"):
            raise ConfigError(f"packing: {self.packing!r} is not one of shared, packed, padded")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for key in ("max_len", "batch_size", "pack_len", "chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


def read_fact_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a facts file (.jsonl, or a .json array), validated; errors name the file, line and field."""
    from kt_jax.data.records import check_fields, read_rows

    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    rows = read_rows(path)
    if path.suffix == ".jsonl":  # errors name the line (read_rows skips blank lines)
        text = path.read_text(encoding="utf-8")
        wheres = [f"line {n}" for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        wheres = [f"row {i}" for i in range(len(rows))]
    for row, where in zip(rows, wheres, strict=True):
        check_fields(row, f"{path}: {where}", strings=("question",), optional=("input",), string_lists=("facts",))
    return rows


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What ties an output row to its input row: the question, its context and its number of facts."""
    return row.get("question"), row.get("input", ""), len(row.get("facts") or [])


def score_file(cfg: ScoreConfig, *, mesh: Mesh | None, progress: bool = True) -> dict[str, Any]:
    """Score every fact of `cfg.input` on `mesh` in `cfg.dtype`, appending to `cfg.output`; returns a summary."""
    from kt_jax.data.templates import question_text
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.inference.scoring import score_facts
    from kt_jax.model.hf import load_pretrained

    cfg.validate()
    if not (cfg.model and cfg.input and cfg.output):
        raise ConfigError("model, input and output are required (HF model directory, facts file, scored file)")
    in_path, out_path = Path(cfg.input), Path(cfg.output)
    tokenizer = cfg.tokenizer or cfg.model
    stamp = {"model": cfg.model, "tokenizer": tokenizer, "input": str(in_path), "template": cfg.template,
             "style": cfg.style, "max_len": cfg.max_len, "dtype": cfg.dtype,
             **({} if cfg.add_bos else {"add_bos": False})}  # files scored with BOS keep their stamp
    layout = {"packing": cfg.packing, "batch_size": cfg.batch_size, "pack_len": cfg.pack_len,
              "mesh": dict(mesh.shape) if mesh is not None else None}  # change speed only, never the numbers
    writer = ResumableJsonl(out_path, stamp=stamp, info=layout, what="scored rows",
                            stamp_path=out_path.with_name(out_path.stem + ".config.json"))
    rows = read_fact_rows(in_path)
    done = writer.done(rows, _row_key)
    todo = rows[done:]
    summary: dict[str, Any] = {"output": str(out_path), "rows": len(rows), "facts": sum(len(r["facts"]) for r in rows),
                               "already": done, "new": len(todo), "fact_tokens": 0, "empty": 0, "truncated": 0,
                               "max_len": cfg.max_len, "seconds": 0.0}
    if progress:
        print(f"{in_path}: {len(rows)} rows, {summary['facts']} facts; {done} rows already scored, "
              f"{len(todo)} to go")
    if not todo:
        return summary
    tok = load_tokenizer(tokenizer)
    start = time.perf_counter()
    model = load_pretrained(cfg.model, mesh=mesh, dtype=cfg.dtype)
    for c in range(0, len(todo), cfg.chunk):
        part = todo[c : c + cfg.chunk]
        items = [(question_text(r["question"], r.get("input", "")), r["facts"]) for r in part]
        scores = score_facts(model, tok, items, template=cfg.template, style=cfg.style, max_len=cfg.max_len,
                             add_bos=cfg.add_bos, mesh=mesh, packing=cfg.packing, batch_size=cfg.batch_size,
                             pack_len=cfg.pack_len, progress=progress)
        out = []
        for row, row_scores in zip(part, scores, strict=True):
            ppl = [None if math.isnan(s.ppl) else s.ppl for s in row_scores]
            out.append({**row, "ppl": ppl, "ppl_tokens": [s.n_tokens for s in row_scores],
                        "ppl_truncated": [s.truncated for s in row_scores]})
            summary["fact_tokens"] += sum(s.n_tokens for s in row_scores)
            summary["empty"] += sum(p is None for p in ppl)
            summary["truncated"] += sum(s.truncated for s in row_scores)
        writer.append(out)
    summary["seconds"] = time.perf_counter() - start
    return summary
