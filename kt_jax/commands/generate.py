"""`kt-jax generate`: answer a QA test set with a checkpoint; writes predictions.jsonl (resumable) and the config.

The work is `kt_jax.inference.generate_file.generate_file`; this module turns the command line into its config.
"""

from __future__ import annotations

import argparse

from kt_jax.commands._mesh import add_mesh_arguments, mesh_from_args
from kt_jax.inference.generate_file import DTYPES, PRESETS, GenerateConfig, generate_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (one per GenerateConfig key, plus the mesh)."""
    parser.add_argument("--model", required=True, help="HF Llama directory (merged/exported checkpoint)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model directory)")
    parser.add_argument("--data", required=True, help="QA test set: alpaca JSON/JSONL (instruction, input, output)")
    parser.add_argument("--out", required=True, help="run directory for predictions.jsonl and generate_config.json")
    parser.add_argument("--preset", default="knowtuning", choices=list(PRESETS),
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
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype")
    add_mesh_arguments(parser)


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The GenerateConfig the command line names."""
    return GenerateConfig(model=args.model, tokenizer=args.tokenizer or "", data=args.data, out=args.out,
                          preset=args.preset, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                          max_prompt_len=args.max_prompt_len, template=args.template, limit=args.limit,
                          chunk=args.chunk, dtype=args.dtype)


def run(args: argparse.Namespace) -> int:
    """Generate the missing predictions and print what was written."""
    s = generate_file(config_from_args(args), mesh=mesh_from_args(args))
    print(f"wrote {s['output']}: {s['predictions']} predictions ({s['new']} new, {s['new_tokens']} tokens, "
          f"{s['new_tokens'] / max(s['seconds'], 1e-9):.1f} tok/s incl. load+compile) in {s['seconds']:.1f} s")
    return 0
