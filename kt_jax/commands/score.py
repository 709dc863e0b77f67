"""`kt-jax score`: perplexity of every fact given its question; writes scored.jsonl (resumable) and its config.

The work is `kt_jax.inference.score_file.score_file`; this module turns the command line into its ScoreConfig.
"""

from __future__ import annotations

import argparse

from kt_jax.commands._mesh import add_mesh_arguments, mesh_from_args
from kt_jax.inference.score_file import DTYPES, ScoreConfig, score_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (one per ScoreConfig key, its defaults, plus the mesh)."""
    default = ScoreConfig()
    parser.add_argument("--model", required=True, help="HF Llama directory (the model being tuned)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model directory)")
    parser.add_argument("--input", required=True, help="facts.jsonl: rows with 'question' and 'facts'")
    parser.add_argument("--output", required=True, help="scored.jsonl (the config goes next to it)")
    parser.add_argument("--template", default=default.template, choices=["alpaca", "raw"],
                        help="prompt built from question")
    parser.add_argument("--style", default=default.style, help="alpaca template style")
    parser.add_argument("--max-len", type=int, default=default.max_len,
                        help="prompt + fact token limit (longer facts are cut)")
    parser.add_argument("--packing", default=default.packing, choices=["shared", "packed", "padded"],
                        help="shared: prompt once per question, facts as sibling segments (fastest)")
    parser.add_argument("--batch-size", type=int, default=default.batch_size,
                        help="rows per jitted call (rounded up to the mesh's batch ways: one row per device)")
    parser.add_argument("--pack-len", type=int, default=default.pack_len, help="tokens packed per row")
    parser.add_argument("--chunk", type=int, default=default.chunk,
                        help="input rows scored per write (resume granularity)")
    parser.add_argument("--dtype", default=default.dtype, choices=list(DTYPES), help="compute dtype")
    add_mesh_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    """The ScoreConfig the command line names."""
    return ScoreConfig(model=args.model, tokenizer=args.tokenizer or "", input=args.input, output=args.output,
                       template=args.template, style=args.style, max_len=args.max_len, packing=args.packing,
                       batch_size=args.batch_size, pack_len=args.pack_len, chunk=args.chunk, dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    """Score the file and print what was written."""
    cfg = config_from_args(args)
    cfg.validate()
    s = score_file(cfg, mesh=mesh_from_args(args))
    if s["new"]:
        print(f"wrote {s['output']}: {s['already'] + s['new']} rows ({s['new']} new, {s['fact_tokens']} fact tokens, "
              f"{s['empty']} facts without tokens -> ppl null, {s['truncated']} truncated to --max-len "
              f"{s['max_len']}) in {s['seconds']:.1f} s incl. load")
    return 0
