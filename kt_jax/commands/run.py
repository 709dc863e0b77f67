"""`kt-jax run --config configs/NAME.yaml [key=value ...]`: the KnowTuning stages end to end in a run directory."""

from __future__ import annotations

import argparse

from kt_jax.config import OVERRIDE_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML (e.g. configs/world-tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"{OVERRIDE_HELP}; e.g. run_dir=runs/x world.seed=1 sft.train.num_epochs=2")


def run(args: argparse.Namespace) -> int:
    import logging

    from kt_jax.config import load_config
    from kt_jax.distributed import initialize_from_env, is_main_process, setup_logging
    from kt_jax.workflow.config import SYSTEM_LABELS, PipelineConfig
    from kt_jax.workflow.stages import Pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)  # config errors before any cluster set-up
    initialize_from_env()  # multi-process JAX when launched so (KT_JAX_* variables, or auto on TPU VMs)
    setup_logging()
    logging.getLogger("absl").setLevel(logging.WARNING)
    if cfg.seeds:
        from kt_jax.workflow.replicate import run_seeds

        summary = run_seeds(cfg)
        if is_main_process():
            print(f"\nkt-jax run {cfg.name}: seeds {list(cfg.seeds)} done in {summary['seconds']:.0f} s -> "
                  f"{summary['run_dir']}")
            for name, values in summary["metrics"].items():
                c = values.get("completeness", {})
                print(f"  {SYSTEM_LABELS.get(name, name):22s} completeness {c.get('mean', float('nan')):.4f} "
                      f"± {c.get('std') or 0.0:.4f}")
            print(f"report: {summary['report']}")
        return 0
    pipeline = Pipeline(cfg)
    summary = pipeline.run()
    if not is_main_process():
        return 0
    print(f"\nkt-jax run {cfg.name}: done in {summary['seconds']:.0f} s -> {summary['run_dir']}")
    for stage in summary["stages"]:
        took = "skipped (up to date)" if stage["skipped"] else f"{stage['seconds']:.1f} s"
        print(f"  {stage['name']:22s} {took}")
    keys = ("completeness", "factuality", "logicality", "meteor", "rouge_l")
    print("  " + "system".ljust(22) + "".join(k[:12].rjust(13) for k in keys))
    for name, m in summary["metrics"].items():
        cells = "".join((f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-").rjust(13) for k in keys)
        print("  " + SYSTEM_LABELS.get(name, name).ljust(22) + cells)
    print(f"report: {summary['report']}")
    return 0
