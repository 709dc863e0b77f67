"""`kt-jax score`: perplexity of every fact given its question; writes scored.jsonl (resumable) and its config.

Input rows `{"question": str, "facts": [str, ...], ...}` (JSON lines; extra fields are kept), e.g. the facts.jsonl
of `kt-jax knowledge`. A non-empty `input` field (alpaca context) joins the question on its own line, exactly as the
alpaca template builds the training prompt from instruction + input. Each output row is
the input row plus `ppl` (one float per fact; null when the fact has no token), `ppl_tokens` (scored tokens per
fact) and `ppl_truncated` (the fact was cut to fit --max-len). A re-run appends only the rows not yet written.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from kt_jax.errors import ConfigError, DataError
from kt_jax.sharding import add_mesh_arguments, mesh_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF Llama directory (the model being tuned)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model directory)")
    parser.add_argument("--input", required=True, help="facts.jsonl: rows with 'question' and 'facts'")
    parser.add_argument("--output", required=True, help="scored.jsonl (the config goes next to it)")
    parser.add_argument("--template", default="alpaca", choices=["alpaca", "raw"], help="prompt built from question")
    parser.add_argument("--style", default="llamafactory-0.5.3", help="alpaca template style")
    parser.add_argument("--max-len", type=int, default=1024, help="prompt + fact token limit (longer facts are cut)")
    parser.add_argument("--packing", default="shared", choices=["shared", "packed", "padded"],
                        help="shared: prompt once per question, facts as sibling segments (fastest)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per jitted call")
    parser.add_argument("--pack-len", type=int, default=512, help="tokens packed per row")
    parser.add_argument("--chunk", type=int, default=256, help="input rows scored per write (resume granularity)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    add_mesh_arguments(parser)


def read_fact_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a facts JSONL file, validated; errors name the file, line and field."""
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("question"), str):
                raise DataError(f"{path}: line {line_no}: field 'question' must be a string")
            if not isinstance(row.get("input", ""), str):
                raise DataError(f"{path}: line {line_no}: field 'input' must be a string when present")
            facts = row.get("facts")
            if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
                raise DataError(f"{path}: line {line_no}: field 'facts' must be a list of strings")
            rows.append(row)
    return rows


def _written_rows(path: Path, inputs: list[dict[str, Any]]) -> int:
    """How many complete rows `path` holds (a torn last line is dropped); they must match the input's rows."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")
    complete, good = lines[:-1], []  # text after the last newline is a torn write
    for i, line in enumerate(complete):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {i + 1}: invalid JSON in an earlier output; delete the file") from None
        if i >= len(inputs) or row.get("question") != inputs[i]["question"] or len(row.get("ppl", [])) != len(
                inputs[i]["facts"]):
            raise DataError(f"{path}: line {i + 1}: does not match input row {i + 1}; was it written for another "
                            "input? delete it to start over")
        good.append(line)
    if lines[-1]:
        path.write_text("".join(x + "\n" for x in good), encoding="utf-8")
    return len(good)


def run(args: argparse.Namespace) -> int:
    from kt_jax.data.templates import question_text
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.model.hf import load_pretrained
    from kt_jax.scoring import score_facts

    in_path, out_path = Path(args.input), Path(args.output)
    config = {"model": str(args.model), "tokenizer": str(args.tokenizer or args.model), "input": str(in_path),
              "template": args.template, "style": args.style, "max_len": args.max_len, "dtype": args.dtype}
    layout = {"packing": args.packing, "batch_size": args.batch_size, "pack_len": args.pack_len,
              "mesh": [args.mesh_data, args.mesh_fsdp, args.mesh_tensor]}  # change speed only, never the numbers
    config_path = out_path.with_name(out_path.stem + ".config.json")
    if config_path.exists() and out_path.exists():
        old = json.loads(config_path.read_text())
        if old.get("scoring") != config:
            raise ConfigError(f"{config_path}: {out_path} was written with a different config "
                              f"({old.get('scoring')}); use another --output or delete it")
    rows = read_fact_rows(in_path)
    done = _written_rows(out_path, rows)
    todo = rows[done:]
    print(f"{in_path}: {len(rows)} rows, {sum(len(r['facts']) for r in rows)} facts; {done} rows already scored, "
          f"{len(todo)} to go")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps({"scoring": config, "layout": layout}, indent=2) + "\n")
    if not todo:
        return 0
    tok = load_tokenizer(args.tokenizer or args.model)
    mesh = mesh_from_args(args)
    start = time.perf_counter()
    model = load_pretrained(args.model, mesh=mesh, dtype=args.dtype)
    tokens = empty = truncated = 0
    with open(out_path, "a", encoding="utf-8") as fh:
        for c in range(0, len(todo), args.chunk):
            part = todo[c : c + args.chunk]
            items = [(question_text(r["question"], r.get("input", "")), r["facts"]) for r in part]
            scores = score_facts(model, tok, items, template=args.template,
                                 style=args.style, max_len=args.max_len, mesh=mesh, packing=args.packing,
                                 batch_size=args.batch_size, pack_len=args.pack_len, progress=True)
            for row, row_scores in zip(part, scores, strict=True):
                ppl = [None if math.isnan(s.ppl) else s.ppl for s in row_scores]
                out = {**row, "ppl": ppl, "ppl_tokens": [s.n_tokens for s in row_scores],
                       "ppl_truncated": [s.truncated for s in row_scores]}
                fh.write(json.dumps(out, ensure_ascii=False) + "\n")
                tokens += sum(s.n_tokens for s in row_scores)
                empty += sum(p is None for p in ppl)
                truncated += sum(s.truncated for s in row_scores)
            fh.flush()
    seconds = time.perf_counter() - start
    print(f"wrote {out_path}: {done + len(todo)} rows ({len(todo)} new, {tokens} fact tokens, {empty} facts without "
          f"tokens -> ppl null, {truncated} truncated to --max-len {args.max_len}) in {seconds:.1f} s incl. load")
    return 0
