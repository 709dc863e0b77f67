"""Resumable stages in a run directory: a stage whose outputs exist for the same key is skipped."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kt_jax.config import config_hash

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) of a file, or of every file below a directory (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclasses.dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    outputs: dict[str, str]
    summary: dict[str, Any]


class Runner:
    """Runs named stages inside `run_dir`, recording each finished stage's key in `run_dir/stages/`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        (self.run_dir / "stages").mkdir(parents=True, exist_ok=True)
        self.results: list[StageResult] = []

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def stage(
        self,
        name: str,
        fn: Callable[[], dict[str, Any] | None],
        *,
        params: Any,
        inputs: Sequence[str | Path] = (),
        outputs: Sequence[str | Path] = (),
    ) -> StageResult:
        """Run `fn` unless a finished record with the same key (params + input digests) and all outputs exist."""
        key = config_hash({"params": params if not dataclasses.is_dataclass(params) else dataclasses.asdict(params),
                           "inputs": {str(p): file_digest(p) for p in inputs}})
        marker = self.path("stages", f"{name}.json")
        outs = [Path(o) for o in outputs]
        if marker.exists():
            record = json.loads(marker.read_text())
            if record.get("key") == key and all(o.exists() for o in outs):
                result = StageResult(name, True, 0.0, record.get("outputs", {}), record.get("summary", {}))
                self.results.append(result)
                log.info("stage %s: up to date, skipped", name)
                return result
            marker.unlink()
        start = time.perf_counter()
        summary = fn() or {}
        missing = [str(o) for o in outs if not o.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished without writing {', '.join(missing)}")
        result = StageResult(name, False, time.perf_counter() - start, {o.name: str(o) for o in outs}, summary)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": result.seconds, "outputs": result.outputs,
                                   "summary": summary}, indent=2, default=str))
        os.replace(tmp, marker)  # atomic: a stage counts as finished only once this file exists
        self.results.append(result)
        return result
