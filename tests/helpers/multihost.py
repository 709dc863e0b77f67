"""Multi-process test helpers (moved out of `kt_jax.distributed`, where nothing in the library called them)."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

from kt_jax.distributed import is_main_process


def broadcast_from_main(obj: Any) -> Any:
    """Process 0's value of a JSON-serialisable `obj`, on every process (one process: `obj` itself)."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    size = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([data.size], np.int32)))[0])
    buf = np.zeros(size, np.uint8)
    buf[: data.size] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes().decode())
