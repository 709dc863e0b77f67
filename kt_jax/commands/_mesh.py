"""The commands' --mesh-data/--mesh-fsdp/--mesh-tensor options and the Mesh they name."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jax.sharding import Mesh

DEFAULTS = {"data": 1, "fsdp": -1, "tensor": 1}


def add_mesh_arguments(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """--mesh-* options (one may be -1: all remaining devices); `optional`: no mesh unless one is given."""
    tail = " (default: one device, unsharded)" if optional else ""
    for axis, help_text in (("data", "data-parallel axis size"), ("fsdp", "FSDP axis size (-1: remaining devices)"),
                            ("tensor", "tensor-parallel axis size")):
        parser.add_argument(f"--mesh-{axis}", type=int, default=None if optional else DEFAULTS[axis],
                            help=help_text + tail)


def mesh_sizes(args: argparse.Namespace) -> list[int] | None:
    """[data, fsdp, tensor] as given (missing sizes take the defaults); None when no size was given at all."""
    given = [getattr(args, f"mesh_{axis}", None) for axis in DEFAULTS]
    if all(v is None for v in given):
        return None
    return [DEFAULTS[axis] if v is None else v for axis, v in zip(DEFAULTS, given, strict=True)]


def mesh_from_args(args: argparse.Namespace) -> Mesh | None:
    """The Mesh named by the --mesh-* options (None when they are optional and none was given)."""
    from kt_jax.sharding import make_mesh

    sizes = mesh_sizes(args)
    return None if sizes is None else make_mesh(*sizes)
