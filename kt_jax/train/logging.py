"""Metrics sinks: JSON lines (one per logged step / evaluation) and TensorBoard (tensorboardX)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append metrics to `<run_dir>/metrics.jsonl` and, when enabled, TensorBoard under `<run_dir>/tb`."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run rewrites what came after its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) is not None
                    and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """One record {"step", "split", metrics...}; non-finite values are written as null."""
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._fh.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        """Flush and close both sinks."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> Any:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
