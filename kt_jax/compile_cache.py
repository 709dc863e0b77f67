"""JAX's persistent compilation cache for kt-jax commands: a compiled program is reused by every later stage, run and
seed that builds the same program (same shapes, same HLO), instead of being compiled again.

On the world's tiny models compiling is a large share of a run (the world-ci job: 52 compilations, 55-60 s of a
~150 s run on 2 cores; a second run with the cache warm compiles in 2.7 s). The train step reads its learning-rate
schedule from the optimizer state (`train.optimizer`), so SFT, KA-SFT, every search candidate and every seed share
one compiled step per batch shape; generation and scoring programs depend only on shapes.

Directory: `$KT_JAX_COMPILE_CACHE`, else `$XDG_CACHE_HOME/kt-jax/jax` (default `~/.cache/kt-jax/jax`); set
`KT_JAX_COMPILE_CACHE=off` to disable. The cache is keyed by JAX on the program, backend, jax version and device
kind, so a stale or foreign entry is never used; deleting the directory is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "KT_JAX_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 0.2  # programs that compile faster than this are not worth a disk entry


def cache_dir() -> Path | None:
    """The cache directory this process should use, or None when disabled."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kt-jax" / "jax"


def enable_compile_cache(path: str | Path | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `path` (default: `cache_dir()`); returns the directory used.

    Leaves a cache the user already configured (`jax_compilation_cache_dir`, e.g. through JAX_COMPILATION_CACHE_DIR)
    as it is. An unwritable directory disables the cache instead of failing the command.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    target = Path(path).expanduser() if path is not None else cache_dir()
    if target is None:
        return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(target, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target
