"""`kt-jax plan --config CFG [key=value ...]`: per-device memory and FLOPs of the configured SFT/DPO steps and the
scoring call, compiled on abstract shapes (no weights), with a verdict against an accelerator's memory."""

from __future__ import annotations

import argparse

from kt_jax.config import OVERRIDE_HELP
from kt_jax.plan import ACCELERATORS, MODEL_PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a `kt-jax run` YAML (e.g. configs/dolly-llama2-7b.yaml)")
    parser.add_argument("--devices", type=int, default=8, help="devices to plan for (emulated on CPU; default 8)")
    parser.add_argument("--accelerator", default="v5e", choices=sorted(ACCELERATORS),
                        help="device whose memory the verdict is against (default v5e)")
    parser.add_argument("--model-config", default=None, choices=sorted(MODEL_PRESETS),
                        help="architecture preset instead of base_model's config.json (no checkpoint needed)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON instead of text")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"{OVERRIDE_HELP}; e.g. sft.data.batch_size=16 mesh.tensor=2")


def _devices(n: int) -> tuple[list, str]:
    """`n` devices: real accelerators when JAX has them, else `n` emulated CPU devices (set before JAX starts)."""
    import os

    import jax

    from kt_jax.errors import ConfigError
    from kt_jax.plan import CPU_SCHEDULER_FLAG

    flags = os.environ.get("XLA_FLAGS", "")
    try:
        jax.config.update("jax_num_cpu_devices", n)
        if "concurrency_optimized_scheduler" not in flags:  # read when the backend starts, i.e. after this
            os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
        note = (f"(set jax_num_cpu_devices={n}, as XLA_FLAGS=--xla_force_host_platform_device_count={n} would, "
                f"and {CPU_SCHEDULER_FLAG})")
    except RuntimeError:  # JAX already started: use what it has
        note = "(JAX was already initialised: its devices and XLA flags as they are)"
    devices = jax.devices()
    if len(devices) < n:
        raise ConfigError(f"--devices {n}: only {len(devices)} {devices[0].platform} devices are available")
    return devices[:n], note


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from kt_jax.errors import ConfigError
    from kt_jax.plan import load_run_config, plan_run

    if args.devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    cfg = load_run_config(args.config, args.overrides, args.model_config)
    devices, note = _devices(args.devices)
    mesh = cfg.mesh.build(devices)
    plan = plan_run(cfg, mesh, args.accelerator, args.model_config)
    if args.json:
        print(f"{len(devices)} {plan.platform} devices {note}", file=sys.stderr)
        print(json.dumps({"model": plan.model, "mesh": plan.mesh, "platform": plan.platform,
                          "accelerator": plan.accelerator.name, "rows": plan.table()}, indent=2))
    else:
        print(f"{len(devices)} {plan.platform} devices {note}")
        print(plan.render())
    return 0
