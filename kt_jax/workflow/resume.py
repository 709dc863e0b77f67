"""Resumable stages: each finished stage records a key chained from its upstream stages' keys and its own settings.

A stage is skipped when its record holds the same key and its outputs exist. Keys never re-read what earlier stages
wrote (a stage's outputs are determined by its key); files from outside the run (the user's data, a base model) are
fingerprinted: small files by content, larger files and directories by names, sizes and modification times.
"""

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

from kt_jax.config import config_hash, to_dict

log = logging.getLogger(__name__)
CONTENT_HASH_LIMIT = 64 << 20  # files up to this size are fingerprinted by their bytes


def fingerprint(path: str | Path) -> str:
    """A 16-hex-digit fingerprint of an external input (see the module docstring); 'missing' if absent."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file() and path.stat().st_size <= CONTENT_HASH_LIMIT:
        h.update(path.read_bytes())
    elif path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        return "missing"
    return h.hexdigest()[:16]


def _plain(settings: Any) -> Any:
    return to_dict(settings) if dataclasses.is_dataclass(settings) else settings


@dataclasses.dataclass
class StageResult:
    name: str
    key: str
    skipped: bool
    seconds: float
    outputs: dict[str, str]
    summary: dict[str, Any]


class Stages:
    """Runs named stages inside `run_dir`, recording each finished one in `run_dir/stages/<name>.json`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        (self.run_dir / "stages").mkdir(parents=True, exist_ok=True)
        self.results: list[StageResult] = []
        self.keys: dict[str, str] = {}

    def key(self, name: str, settings: Any, upstream: Sequence[str], external: Sequence[str | Path]) -> str:
        """The stage's key: its settings, its upstream stages' keys and its external inputs' fingerprints."""
        missing = [u for u in upstream if u not in self.keys]
        if missing:
            raise RuntimeError(f"stage {name}: upstream stage(s) {missing} have not run in this pipeline")
        return config_hash({"stage": name, "settings": _plain(settings),
                            "upstream": {u: self.keys[u] for u in upstream},
                            "external": {str(p): fingerprint(p) for p in external}})

    def _clear_stale(self, name: str, key: str, paths: Sequence[Path]) -> None:
        """Delete `paths` unless stage `name` last started under `key`; then record that it starts under `key`."""
        import shutil

        from kt_jax.distributed import is_main_process, sync

        started = self.run_dir / "stages" / f"{name}.started"
        if started.exists() and started.read_text().strip() == key:
            return
        if is_main_process():
            for path in paths:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
                    log.info("stage %s: removed %s (written under other settings or inputs)", name, path)
            started.parent.mkdir(parents=True, exist_ok=True)
            started.write_text(key + "\n")
        sync(f"stage-{name}-{key[:12]}")

    def record(self, name: str) -> dict[str, Any] | None:
        """The finished record of stage `name`, if any."""
        marker = self.run_dir / "stages" / f"{name}.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None], *, settings: Any,
            upstream: Sequence[str] = (), external: Sequence[str | Path] = (),
            outputs: Sequence[str | Path] = (), scratch: Sequence[str | Path] = ()) -> StageResult:
        """Run `fn` unless stage `name` finished before with the same key and its outputs all exist.

        `scratch`: files and directories the stage resumes from (checkpoints, partly written predictions, scored
        facts). The library stamps them with paths, and a path (a model directory) can hold other contents under a
        new key; so when the stage starts under a key other than the one it last started under, they and the
        outputs are deleted first. A stage killed and restarted under the same key resumes from them.
        """
        key = self.key(name, settings, upstream, external)
        self.keys[name] = key
        marker = self.run_dir / "stages" / f"{name}.json"
        outs = [Path(o) for o in outputs]
        record = self.record(name)
        if record is not None:
            if record.get("key") == key and all(o.exists() for o in outs):
                result = StageResult(name, key, True, 0.0, record.get("outputs", {}), record.get("summary", {}))
                self.results.append(result)
                log.info("stage %s: up to date, skipped", name)
                return result
            marker.unlink()
        self._clear_stale(name, key, [*outs, *(Path(p) for p in scratch)])
        start = time.perf_counter()
        summary = fn() or {}
        missing = [str(o) for o in outs if not o.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished without writing {', '.join(missing)}")
        result = StageResult(name, key, False, time.perf_counter() - start, {o.name: str(o) for o in outs}, summary)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "seconds": result.seconds, "outputs": result.outputs,
                                   "summary": summary}, indent=2, default=str))
        os.replace(tmp, marker)  # atomic: a stage counts as finished only once this file exists
        self.results.append(result)
        return result
