"""Crash-safe on-disk cache of backend calls: sqlite in WAL mode, one row per call, committed before it is used.

Key = sha256 of (backend, model, prompt version, operation, input). A row is either a validated answer or a
rejection with its reason, so a re-run makes no call for an item that finished either way (pass
`retry_rejects=True` to the backend to try rejected items again). Each thread gets its own connection; sqlite's
locking (busy timeout 60 s) makes concurrent threads and processes safe. Message-batch ids are stored here too,
so a crashed batch job resumes by id instead of resubmitting.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY, op TEXT NOT NULL, status TEXT NOT NULL, result TEXT, reason TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    job TEXT PRIMARY KEY, batch_id TEXT NOT NULL, keys TEXT NOT NULL, created REAL NOT NULL
);
"""


def cache_key(backend: str, model: str, prompt_version: str, op: str, data: dict[str, Any]) -> str:
    """The hex sha256 identifying one call."""
    blob = json.dumps({"backend": backend, "model": model, "prompt_version": prompt_version, "op": op,
                       "input": data}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class KnowledgeCache:
    """sqlite-backed store of answers and rejections (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            for attempt in range(50):  # switching to WAL needs a moment alone with a brand-new file
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> tuple[str, Any] | None:
        """("ok", answer) or ("rejected", reason) for a finished call, else None."""
        row = self._conn().execute("SELECT status, result, reason FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        status, result, reason = row
        return (status, json.loads(result)) if status == "ok" else (status, reason)

    def put(self, key: str, op: str, answer: Any) -> None:
        """Store a validated answer (committed when this returns)."""
        self._conn().execute("INSERT OR REPLACE INTO calls VALUES (?, ?, 'ok', ?, NULL, ?)",
                             (key, op, json.dumps(answer, ensure_ascii=False), time.time()))

    def reject(self, key: str, op: str, reason: str) -> None:
        """Store a rejection with its reason (committed when this returns)."""
        self._conn().execute("INSERT OR REPLACE INTO calls VALUES (?, ?, 'rejected', NULL, ?, ?)",
                             (key, op, reason, time.time()))

    def forget(self, key: str) -> None:
        """Drop one call (used to retry a rejection)."""
        self._conn().execute("DELETE FROM calls WHERE key = ?", (key,))

    def counts(self) -> dict[str, int]:
        """Number of cached rows per status."""
        rows = self._conn().execute("SELECT status, COUNT(*) FROM calls GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def save_batch(self, job: str, batch_id: str, keys: list[str]) -> None:
        """Remember a submitted message batch (before waiting on it)."""
        self._conn().execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)",
                             (job, batch_id, json.dumps(keys), time.time()))

    def find_batch(self, job: str) -> tuple[str, list[str]] | None:
        """(batch id, request keys) of a job submitted earlier, or None."""
        row = self._conn().execute("SELECT batch_id, keys FROM batches WHERE job = ?", (job,)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def drop_batch(self, job: str) -> None:
        """Forget a batch job once its results are collected."""
        self._conn().execute("DELETE FROM batches WHERE job = ?", (job,))

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
