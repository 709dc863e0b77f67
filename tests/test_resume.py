"""Resumable stages: keys chained from upstream keys + own settings; skipped when unchanged, never half-recorded."""

from __future__ import annotations

import os

import pytest

from kt_jax.workflow.resume import Stages, fingerprint


def _pipeline(run: os.PathLike, src, calls: list[str], settings: dict[str, int]) -> Stages:
    """Two stages: a reads the external file src, b depends on a."""
    stages = Stages(run)

    def make(name: str):
        def fn():
            calls.append(name)
            (run / f"{name}.out").write_text(src.read_text())
            return {"n": len(calls)}
        return fn

    stages.run("a", make("a"), settings=settings["a"], external=[src], outputs=[run / "a.out"])
    stages.run("b", make("b"), settings=settings["b"], upstream=["a"], outputs=[run / "b.out"])
    return stages


def test_chained_keys_skip_and_rerun(tmp_path) -> None:
    run, src, calls = tmp_path / "run", tmp_path / "in.txt", []
    src.write_text("x")
    first = _pipeline(run, src, calls, {"a": 1, "b": 1})
    assert calls == ["a", "b"] and not any(r.skipped for r in first.results)
    again = _pipeline(run, src, calls, {"a": 1, "b": 1})
    assert calls == ["a", "b"] and all(r.skipped for r in again.results) and again.results[0].summary == {"n": 1}
    _pipeline(run, src, calls, {"a": 1, "b": 2})  # b's own settings
    assert calls == ["a", "b", "b"]
    _pipeline(run, src, calls, {"a": 2, "b": 2})  # a's settings change a's key, hence b's
    assert calls == ["a", "b", "b", "a", "b"]
    src.write_text("y")  # an external input's content
    _pipeline(run, src, calls, {"a": 2, "b": 2})
    assert calls[-2:] == ["a", "b"] and len(calls) == 7
    (run / "b.out").unlink()  # a missing output reruns that stage only
    _pipeline(run, src, calls, {"a": 2, "b": 2})
    assert calls[-1] == "b" and len(calls) == 8


def test_failed_stage_is_not_recorded(tmp_path) -> None:
    stages = Stages(tmp_path / "run")

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        stages.run("s", boom, settings={}, outputs=[])
    assert not (tmp_path / "run" / "stages" / "s.json").exists()
    with pytest.raises(RuntimeError, match="without writing"):
        stages.run("t", lambda: None, settings={}, outputs=[tmp_path / "never"])
    assert not (tmp_path / "run" / "stages" / "t.json").exists()
    with pytest.raises(RuntimeError, match="upstream"):
        stages.run("u", lambda: None, settings={}, upstream=["nope"])


def test_fingerprint_never_reads_large_or_directory_bytes(tmp_path, monkeypatch) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0" * 1000)
    before = fingerprint(ckpt)
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert fingerprint(ckpt) == before and not opened  # names, sizes, mtimes only
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert fingerprint(ckpt) != before
    small = tmp_path / "train.json"
    small.write_text("[1]")
    a = fingerprint(small)
    small.write_text("[2]")
    assert fingerprint(small) != a and fingerprint(tmp_path / "absent") == "missing"
