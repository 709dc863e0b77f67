"""benchmarks/gpu_check.py runs end to end in --smoke mode (tiny sizes, CPU) and reports every check passing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("kt_jax_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_mode_runs_every_check(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    assert _load().main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    checks = [r["check"] for r in rows]
    assert any(c.startswith("attention") and c.endswith("fwd") for c in checks)
    assert any(c.startswith("attention") and c.endswith("grad") for c in checks)
    assert any(c.startswith("sft step") for c in checks) and any(c.startswith("dpo step") for c in checks)
    assert any(c.startswith("scoring vs HF torch") for c in checks)
    assert all(r["status"] == "ok" for r in rows)
    assert "check" in capsys.readouterr().out  # the one table


def test_peak_table_and_packed_segments() -> None:
    gc = _load()

    class Dev:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    class Cpu:
        platform, device_kind = "cpu", "cpu"

    assert gc.bf16_peak(Dev()) == 989e12 and gc.bf16_peak(Cpu()) is None
    seg, pos = gc.packed_segments(2, 64)
    assert set(seg[0].tolist()) == {0, 1, 2, 3} and seg[0, -1] == 0
    for s in (1, 2, 3):  # positions restart in each segment
        assert pos[0, seg[0] == s][0] == 0 and (pos[0, seg[0] == s] == range((seg[0] == s).sum())).all()
