"""`kt-jax` command line: one subcommand per stage; project errors print as one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kt_jax.errors import KtJaxError

# name -> (module, help). Each module defines add_arguments(parser) and run(args) -> int. Imported lazily so
# `kt-jax --help` stays fast and a stage's heavy imports load only when that stage runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kt_jax.commands.run", "the KnowTuning pipeline end to end (world/pretrain, KA, KC, SFT, DPO, eval)"),
    "info": ("kt_jax.commands.info", "load a HF Llama checkpoint onto a mesh and print its config and layout"),
    "generate": ("kt_jax.commands.generate", "answer a QA test set with a checkpoint (KV-cache sampling)"),
    "eval": ("kt_jax.commands.eval", "METEOR/ROUGE-L/BERTScore, LLM judge win/tie/lose, fact checks, report"),
    "knowledge": ("kt_jax.commands.knowledge", "extract facts, build KA / KC sets from an alpaca file (LLM backend)"),
    "score": ("kt_jax.commands.score", "perplexity of each fact given its question (packed, prefix-shared, sharded)"),
    "sft": ("kt_jax.commands.sft", "supervised fine-tuning (LoRA or full) on QA/KA records, orbax resume, HF export"),
    "dpo": ("kt_jax.commands.dpo", "DPO + chosen NLL on KC pairs (reference log-probs precomputed once), HF export"),
    "plan": ("kt_jax.commands.plan", "per-device memory and FLOPs of a run config's steps (abstract compile)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kt-jax", description="KnowTuning in JAX/Flax")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the kt-jax program, not a caller's process: before any JAX thread allocates
        from kt_jax.host_memory import keep_freed_memory

        keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # top-level options only: help, version, or an unknown command
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.version:
            from kt_jax import __version__

            print(__version__)
            return 0
        parser.print_help()
        return 2
    command = argv[0]
    module = importlib.import_module(COMMANDS[command][0])
    sub = argparse.ArgumentParser(prog=f"kt-jax {command}", description=COMMANDS[command][1])
    module.add_arguments(sub)
    sub_args = sub.parse_args(argv[1:])
    if command != "plan":  # plan compiles abstractly and prints; nothing it builds is worth keeping
        from kt_jax.compile_cache import enable_compile_cache

        enable_compile_cache()
    try:
        return int(module.run(sub_args) or 0)
    except KtJaxError as e:
        print(f"kt-jax {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
