"""One `kt-jax run` per run directory: a second refuses at once naming the holder; a killed holder never blocks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from kt_jax.cli import main
from kt_jax.runlock import RunDirLocked, RunLock

HOLD = """
import sys, time
from kt_jax.runlock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path/run until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_process_is_refused_naming_dir_and_holder(tmp_path, holder) -> None:
    with pytest.raises(RunDirLocked) as err:
        RunLock(tmp_path / "run").acquire()
    msg = str(err.value)
    assert str(tmp_path / "run") in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg


def test_kt_jax_run_refuses_at_once(tmp_path, holder, capsys) -> None:
    code = main(["run", "--config", "configs/world-ci.yaml", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"pid {holder.pid}" in err and "another kt-jax process" in err
    assert not (tmp_path / "run" / "world").exists()  # refused before any stage ran


def test_lock_of_killed_process_does_not_block(tmp_path, holder) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / ".lock").exists()  # the stale file stays; the kernel dropped the lock itself
    with RunLock(tmp_path / "run") as lock:
        assert lock.holder()["pid"] == os.getpid()
    with RunLock(tmp_path / "run"):  # released on exit: taken again
        pass


def test_workers_of_one_job_take_their_own_lock(tmp_path) -> None:
    with RunLock(tmp_path / "run", 0), RunLock(tmp_path / "run", 1), pytest.raises(RunDirLocked):
        RunLock(tmp_path / "run", 1).acquire()
