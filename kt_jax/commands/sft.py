"""`kt-jax sft --config sft.yaml [key.sub=value ...]`: supervised fine-tuning (LoRA or full) on QA / KA records."""

from __future__ import annotations

import argparse
import json

from kt_jax.config import OVERRIDE_HELP, load_config

EPILOG = """\
outputs (output_dir): export/ (HF model, LoRA merged, the best-eval or final params); LoRA runs also write
export/adapter/ (the adapter alone in PEFT format: peft.PeftModel.from_pretrained(<model>, export/adapter)).
init_adapter=DIR (finetuning: lora) starts from a PEFT adapter directory on `model` (its base) and keeps training
that adapter instead of a fresh zero-B one; lora.rank/alpha/targets must equal the adapter's adapter_config.json."""


def add_arguments(parser: argparse.ArgumentParser, epilog: str = EPILOG) -> None:
    """--config and KEY=VALUE overrides; `epilog` closes --help."""
    parser.add_argument("--config", required=True, help="YAML train job config (kt_jax.train.job.TrainJobConfig)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"{OVERRIDE_HELP}; e.g. optim.learning_rate=1e-4")
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def print_summary(summary: dict) -> None:
    """A short end-of-run summary (the full one is in summary.json)."""
    last = summary.get("last", {})
    keys = [k for k in ("loss", "rewards/accuracy", "rewards/margin", "tokens_per_s") if k in last]
    print(f"{summary['mode']} ({summary['finetuning']}): {summary['steps']}/{summary['total_steps']} steps"
          + (f", resumed from step {summary['resumed_from']}" if summary.get("resumed_from") else "")
          + f", {summary['train_rows']} train / {summary['eval_rows']} held-out rows, "
          f"{summary['trainable_params']:,} trained params, {summary['seconds']:.1f} s")
    print("last: " + json.dumps({k: round(last[k], 4) for k in keys}))
    if summary.get("best_step") is not None:
        print(f"best eval loss {summary['best_eval_loss']:.4f} at step {summary['best_step']}")
    if summary.get("export"):
        print(f"exported (HF, LoRA merged, best params): {summary['export']}")
    if summary.get("adapter"):
        print(f"adapter (PEFT format): {summary['adapter']}")


def run(args: argparse.Namespace) -> int:
    from kt_jax.errors import ConfigError
    from kt_jax.train.job import TrainJobConfig, run_training

    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    if cfg.kind == "kc":
        raise ConfigError("kind: 'kc' (preference pairs) trains with `kt-jax dpo`; `kt-jax sft` takes qa or ka")
    print_summary(run_training(cfg))
    return 0
