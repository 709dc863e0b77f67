"""`kt-jax generate`: answer a QA test set with a checkpoint; writes predictions.jsonl (resumable) and the config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from kt_jax.sharding import add_mesh_arguments, mesh_from_args

PREDICTIONS = "predictions.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF Llama directory (merged/exported checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model directory)")
    parser.add_argument("--data", required=True, help="QA test set: alpaca JSON/JSONL (instruction, input, output)")
    parser.add_argument("--out", required=True, help="run directory for predictions.jsonl and generate_config.json")
    parser.add_argument("--preset", default="knowtuning", choices=["knowtuning", "greedy"],
                        help="decoding preset (knowtuning: T=0.95, top-p 0.7, top-k 50, 512 new tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the preset's new-token limit")
    parser.add_argument("--temperature", type=float, default=None, help="override the preset's temperature")
    parser.add_argument("--top-k", type=int, default=None, help="override the preset's top-k (0 = off)")
    parser.add_argument("--top-p", type=float, default=None, help="override the preset's top-p (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (row i uses seed and i)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per jitted generation call")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="prompts keep their last N tokens")
    parser.add_argument("--template", default="llamafactory-0.5.3", help="alpaca template style")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test rows")
    parser.add_argument("--chunk", type=int, default=64, help="prompts written per chunk (the resume granularity)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    add_mesh_arguments(parser)


def sampling_from_args(args: argparse.Namespace):  # -> SamplingConfig
    """The preset with the command line's overrides applied."""
    from kt_jax.generate import SamplingConfig

    sampling = SamplingConfig.preset(args.preset)
    changes = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                  ("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
    return dataclasses.replace(sampling, **changes)


def _done_ids(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row
    return rows


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kt_jax.data.records import read_records
    from kt_jax.data.templates import alpaca_prompt
    from kt_jax.data.tokenizer import load_tokenizer
    from kt_jax.errors import ConfigError
    from kt_jax.generate import encode_prompt, generate_ids
    from kt_jax.model.hf import load_pretrained

    sampling = sampling_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": str(args.model), "tokenizer": str(args.tokenizer or args.model), "data": str(args.data),
              "sampling": dataclasses.asdict(sampling), "seed": args.seed, "batch_size": args.batch_size,
              "max_prompt_len": args.max_prompt_len, "template": args.template, "limit": args.limit,
              "dtype": args.dtype, "mesh": [args.mesh_data, args.mesh_fsdp, args.mesh_tensor]}
    config_path = out / "generate_config.json"
    pred_path = out / PREDICTIONS
    if config_path.exists() and pred_path.exists():
        old = json.loads(config_path.read_text())
        if {k: v for k, v in old.items() if k != "mesh"} != {k: v for k, v in config.items() if k != "mesh"}:
            raise ConfigError(f"{config_path}: an earlier run with a different config wrote {pred_path}; "
                              "use another --out or delete it")
    config_path.write_text(json.dumps(config, indent=2) + "\n")

    records, report = read_records(args.data, "qa")
    records = records[: args.limit] if args.limit else records
    done = _done_ids(pred_path)
    todo = [i for i in range(len(records)) if i not in done]
    print(f"{report.summary()}; {len(done)} already answered, {len(todo)} to go")
    tok = load_tokenizer(args.tokenizer or args.model)
    mesh = mesh_from_args(args)
    start = time.perf_counter()
    model = load_pretrained(args.model, mesh=mesh, dtype=args.dtype)
    new_tokens = 0
    with open(pred_path, "a") as fh, tqdm(total=len(todo), desc="generate", unit="q") as bar:
        for c in range(0, len(todo), args.chunk):
            rows = todo[c : c + args.chunk]
            prompts = [alpaca_prompt(records[i].question, records[i].input, args.template) for i in rows]
            ids = generate_ids(model, [encode_prompt(tok, p) for p in prompts], sampling, eos_ids=(tok.eos_id,),
                               pad_id=tok.pad_id, mesh=mesh, seed=args.seed, batch_size=args.batch_size,
                               max_prompt_len=args.max_prompt_len)
            for i, toks in zip(rows, ids, strict=True):
                finished = bool(toks) and toks[-1] == tok.eos_id
                text = tok.decode([t for t in toks if t != tok.eos_id])
                new_tokens += len(toks)
                fh.write(json.dumps({"id": i, "question": records[i].question, "input": records[i].input,
                                     "reference": records[i].answer, "prediction": text, "new_tokens": len(toks),
                                     "finished": finished}) + "\n")
            fh.flush()
            bar.update(len(rows))
    seconds = time.perf_counter() - start
    total = len(_done_ids(pred_path))
    print(f"wrote {pred_path}: {total} predictions ({len(todo)} new, {new_tokens} tokens, "
          f"{new_tokens / max(seconds, 1e-9):.1f} tok/s incl. load+compile) in {seconds:.1f} s")
    return 0
