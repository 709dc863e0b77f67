"""`kt-jax dpo --config dpo.yaml [key.sub=value ...]`: KnowTuning's DPO (+ chosen NLL) on KC preference pairs.

Which reference the DPO term uses depends on where the policy starts (EPILOG, printed by --help).
"""

from __future__ import annotations

import argparse

from kt_jax.commands.sft import EPILOG as SFT_EPILOG
from kt_jax.commands.sft import add_arguments as _add_arguments
from kt_jax.commands.sft import print_summary
from kt_jax.config import load_config

EPILOG = SFT_EPILOG + """

policy start and DPO reference (log-probs computed once before training, in train.compute_dtype):
  model=BASE init_adapter=KA_RUN/export/adapter   (KnowTuning: LLaMA-Factory --resume_lora_training)
      the policy is BASE + the KA adapter, and that adapter keeps training;
      dpo.reference=base            -> BASE with the adapter disabled (the original's reference)
      dpo.reference=initial_policy  -> BASE + the KA adapter as loaded (policy = reference at step 0)
  model=KA_RUN/export   (the merged KA model)
      the policy is the KA weights (full fine-tuning, or a fresh zero-B adapter under LoRA);
      dpo.reference=base and initial_policy both give the KA weights (the loaded model, adapter off or fresh),
      NOT the original base model: to use the base as reference, start from BASE + init_adapter as above.
  Pairs whose train_file rows already carry ref_chosen_logp/ref_rejected_logp (kt-jax run's reference stage:
  the base model) keep those, whatever dpo.reference says."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and KEY=VALUE overrides, with the reference rules in --help."""
    _add_arguments(parser, EPILOG)


def run(args: argparse.Namespace) -> int:
    from kt_jax.train.job import TrainJobConfig, run_training

    cfg = load_config(TrainJobConfig, args.config, ["kind=kc", *args.overrides])
    print_summary(run_training(cfg))
    return 0
