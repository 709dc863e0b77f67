"""Resumable stages: skipped when settings and inputs are unchanged, re-run otherwise, never half-recorded."""

from __future__ import annotations

import pytest

from kt_jax.runner import Runner


def test_stage_skips_and_reruns(tmp_path) -> None:
    calls: list[str] = []
    src = tmp_path / "in.txt"
    src.write_text("a")

    def make(name: str):
        def fn():
            calls.append(name)
            (tmp_path / f"{name}.out").write_text(src.read_text())
            return {"n": len(calls)}
        return fn

    runner = Runner(tmp_path / "run")
    first = runner.stage("s", make("s"), params={"x": 1}, inputs=[src], outputs=[tmp_path / "s.out"])
    assert not first.skipped and first.summary == {"n": 1}
    again = Runner(tmp_path / "run").stage("s", make("s"), params={"x": 1}, inputs=[src], outputs=[tmp_path / "s.out"])
    assert again.skipped and again.summary == {"n": 1} and calls == ["s"]
    Runner(tmp_path / "run").stage("s", make("s"), params={"x": 2}, inputs=[src], outputs=[tmp_path / "s.out"])
    assert calls == ["s", "s"]
    src.write_text("b")
    Runner(tmp_path / "run").stage("s", make("s"), params={"x": 2}, inputs=[src], outputs=[tmp_path / "s.out"])
    assert calls == ["s", "s", "s"]
    (tmp_path / "s.out").unlink()
    Runner(tmp_path / "run").stage("s", make("s"), params={"x": 2}, inputs=[src], outputs=[tmp_path / "s.out"])
    assert len(calls) == 4


def test_failed_stage_is_not_recorded(tmp_path) -> None:
    runner = Runner(tmp_path / "run")

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runner.stage("s", boom, params={}, outputs=[])
    assert not (tmp_path / "run" / "stages" / "s.json").exists()
    with pytest.raises(RuntimeError, match="without writing"):
        runner.stage("t", lambda: None, params={}, outputs=[tmp_path / "never"])
    assert not (tmp_path / "run" / "stages" / "t.json").exists()
