"""`kt-jax dpo --config dpo.yaml [key.sub=value ...]`: KnowTuning's DPO (+ chosen NLL) on KC preference pairs."""

from __future__ import annotations

import argparse

from kt_jax.commands.sft import add_arguments as _add_arguments
from kt_jax.commands.sft import print_summary
from kt_jax.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from kt_jax.train.job import TrainJobConfig, run_training

    cfg = load_config(TrainJobConfig, args.config, ["kind=kc", *args.overrides])
    print_summary(run_training(cfg))
    return 0
