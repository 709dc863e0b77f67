"""Multi-process runs: `jax.distributed` start-up from arguments or the environment, and the process-0 rule.

Every process of a multi-host job (each TPU VM worker, or each local process in tests) runs the same program and
calls `initialize_from_env()` before any other JAX work. Where the settings come from, first match wins:

- explicit arguments `coordinator_address`, `num_processes`, `process_id`;
- `KT_JAX_COORDINATOR` (host:port of process 0), `KT_JAX_NUM_PROCESSES`, `KT_JAX_PROCESS_ID` (all three, or none);
- `KT_JAX_DISTRIBUTED=auto`: `jax.distributed.initialize()` with no arguments, so JAX detects the cluster itself
  (Cloud TPU VMs, Slurm, Open MPI). The launch scripts in `launch/` set it on every TPU worker.

Nothing set: a single-process run, nothing is initialised. The rule for outputs: every process computes (they all
join the collectives), only process 0 (`is_main_process()`) writes reports, run-directory files and summaries;
`setup_logging()` keeps the other processes' logs to warnings, and `sync()` is the barrier to put between process 0
writing a file and the others reading it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax

from kt_jax.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "KT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "KT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KT_JAX_PROCESS_ID"
ENV_DISTRIBUTED = "KT_JAX_DISTRIBUTED"
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How to start `jax.distributed`: explicit coordinator/count/id, or `auto` (JAX detects the cluster)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `jax.distributed.initialize`."""
        if self.auto:
            return {}
        return {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
                "process_id": self.process_id}


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer") from None


def spec_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedSpec | None:
    """The distributed settings from the arguments, else the environment; None for a single-process run."""
    env = os.environ if env is None else env
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given):
        names = ("coordinator_address", "num_processes", "process_id")
    else:
        given = (env.get(ENV_COORDINATOR) or None, env.get(ENV_NUM_PROCESSES) or None, env.get(ENV_PROCESS_ID) or None)
        names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    if all(v is None for v in given):
        mode = env.get(ENV_DISTRIBUTED, "").strip().lower()
        if mode in ("auto", "1", "true", "yes"):
            return DistributedSpec(auto=True)
        if mode not in ("", "0", "false", "no", "off"):
            raise ConfigError(f"{ENV_DISTRIBUTED}={mode!r}: expected auto (let JAX detect the cluster) or 0")
        return None
    missing = [n for n, v in zip(names, given, strict=True) if v is None]
    if missing:
        raise ConfigError(f"multi-process run: {', '.join(missing)} missing (give all of {', '.join(names)})")
    address = str(given[0])
    if not _ADDRESS.match(address):
        raise ConfigError(f"{names[0]}={address!r}: expected host:port of process 0, e.g. 10.0.0.2:8476")
    count, index = _int(given[1], names[1]), _int(given[2], names[2])
    if count < 1:
        raise ConfigError(f"{names[1]}={count}: must be >= 1")
    if not 0 <= index < count:
        raise ConfigError(f"{names[2]}={index}: must be in [0, {count}) for {names[1]}={count}")
    return DistributedSpec(address, count, index)


def initialize_from_env(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Start `jax.distributed` when this is a multi-process run (see module doc); True if it is initialised."""
    spec = spec_from_env(coordinator_address, num_processes, process_id, env)
    if spec is None:
        return False
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(**spec.kwargs(), initialization_timeout=initialization_timeout)
    except RuntimeError as e:
        where = "JAX cluster auto-detection" if spec.auto else f"coordinator {spec.coordinator_address}"
        raise BackendError(f"jax.distributed.initialize failed ({where}): {e}. It must run before any other "
                           "JAX call, in every process") from None
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that writes reports, run files and summaries)."""
    return jax.process_index() == 0


def main_process_only(fn: F) -> F:
    """Decorate a writer so that it runs on process 0 only (returns None elsewhere)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


def sync(name: str) -> None:
    """Barrier across all processes (no-op with one process): e.g. after process 0 writes what the others read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def setup_logging(level: int = logging.INFO) -> None:
    """Root logging: `level` on process 0; warnings only on the others, whose lines carry their process index."""
    main = is_main_process()
    prefix = "" if jax.process_count() == 1 else f"[p{jax.process_index()}] "
    logging.basicConfig(level=level if main else max(level, logging.WARNING),
                        format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def process_summary() -> dict[str, int]:
    """This process's index and the process/device counts (for run records)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}
