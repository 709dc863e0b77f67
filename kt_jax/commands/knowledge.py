"""`kt-jax knowledge extract|augment|compare|all`: facts, KA and KC files from an alpaca QA file, in a run directory.

The work is `kt_jax.knowledge.job.build_knowledge` (its docstring lists the outputs); this module turns the YAML,
the dotted overrides and the mesh/dtype options into its call.
"""

from __future__ import annotations

import argparse

from kt_jax.commands._mesh import add_mesh_arguments, mesh_from_args
from kt_jax.config import OVERRIDE_HELP, load_config
from kt_jax.knowledge.job import STAGES, KnowledgeConfig, build_knowledge


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options: the stage, a YAML config, dotted overrides, and where the model scorer runs."""
    parser.add_argument("stage", choices=STAGES, help="extract facts, build KA, build KC, or all three")
    parser.add_argument("--config", default=None, help="YAML file with KnowledgeConfig keys")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"{OVERRIDE_HELP}; e.g. alpha=0.3")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the model scorer")
    add_mesh_arguments(parser, optional=True)


def run(args: argparse.Namespace) -> int:
    """Build the requested sets and print their statistics."""
    cfg = load_config(KnowledgeConfig, args.config, args.overrides)
    s = build_knowledge(cfg, stage=args.stage, mesh=mesh_from_args(args), dtype=args.dtype)
    print(f"kt-jax knowledge {s['stage']} -> {s['out']} ({s['seconds']:.1f} s)")
    for key, value in s["stats"].items():
        print(f"  {key}: {value}")
    print(f"  backend: {s['backend']}")
    return 0
