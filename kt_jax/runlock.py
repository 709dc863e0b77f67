"""One writer per run directory: an advisory lock that the kernel releases when its holder dies."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from kt_jax.errors import KtJaxError


class RunDirLocked(KtJaxError):
    """Another live process is working in this run directory (names the directory and the holder)."""


class RunLock:
    """`with RunLock(run_dir):` refuses at once when another live process holds the directory.

    The lock is `flock` on `run_dir/.lock[.pN]`: the kernel drops it when the holder exits or is killed, so a
    lock file left by a killed run never blocks its resume. Each process of a multi-process job (index N > 0)
    takes its own file, so one job's workers sharing a filesystem do not refuse each other.
    """

    def __init__(self, run_dir: str | Path, process_index: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / (".lock" if process_index == 0 else f".lock.p{process_index}")
        self._fh: IO[str] | None = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (may describe a process that has since exited)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            h = self.holder()
            raise RunDirLocked(
                f"{self.run_dir}: another kt-jax process is using this run directory (pid {h.get('pid', '?')} on "
                f"host {h.get('host', '?')}, since {h.get('since', '?')}); wait for it, stop it, or choose "
                "another run_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
