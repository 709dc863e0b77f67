"""One resumable JSONL output for scoring, generation and knowledge: a stamp of its settings, complete rows kept.

A file holds one output row per input row, in input order, appended in chunks and flushed after each, so a killed
run leaves complete rows plus at most one torn last line. A re-run reads the stamp beside the file (the settings that
determine the rows), drops the torn line, checks every complete row against its input row and continues after them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kt_jax.errors import ConfigError, DataError

Row = dict[str, Any]
Key = str | Sequence[str] | Callable[[Row], Any]


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _key_fn(key: Key) -> Callable[[Row], Any]:
    """A function of a row from a field name, a sequence of field names or a function."""
    if callable(key):
        return key
    fields = (key,) if isinstance(key, str) else tuple(key)
    return lambda row: tuple(_plain(row.get(f)) for f in fields)


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The top-level keys whose values differ between two stamps (missing on one side counts)."""
    return sorted(k for k in set(old) | set(new) if k not in old or k not in new or old[k] != new[k])


class ResumableJsonl:
    """An append-only JSONL file with one row per input row that a re-run continues where it stopped.

    `stamp` holds the settings that determine the rows; it is written to `stamp_path` (default
    `<path>.stamp.json`) with `info` (settings that change speed only, e.g. the mesh: recorded, never compared).
    Rows already written under another stamp raise ConfigError, or with `restart=True` are discarded.
    """

    def __init__(self, path: str | Path, *, stamp: dict[str, Any], what: str, info: dict[str, Any] | None = None,
                 stamp_path: str | Path | None = None, restart: bool = False, ensure_ascii: bool = False) -> None:
        self.path = Path(path)
        self.stamp_path = Path(stamp_path) if stamp_path is not None else self.path.with_name(
            self.path.name + ".stamp.json")
        self.stamp, self.info, self.what = _plain(stamp), _plain(info or {}), what
        self.restart, self.ensure_ascii = restart, ensure_ascii
        self.count: int | None = None  # rows in the file, known once done() has run

    def _old_stamp(self) -> dict[str, Any] | None:
        """The stamp stored beside the file (None when there is none or it is unreadable)."""
        try:
            stored = json.loads(self.stamp_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return stored.get("stamp") if isinstance(stored, dict) and isinstance(stored.get("stamp"), dict) else None

    def _check_stamp(self) -> None:
        """Raise (or discard the rows, with restart) when existing rows were written under another stamp."""
        if not self.path.exists():
            return
        old = self._old_stamp()
        if old == self.stamp:
            return
        if self.restart:
            self.path.unlink()
            return
        if old is None:
            raise ConfigError(f"{self.stamp_path}: missing or unreadable, so the {self.what} in {self.path} cannot "
                              "be matched to this config; use another output or delete it")
        raise ConfigError(f"{self.stamp_path}: the {self.what} in {self.path} were written with a different config "
                          f"(differs in {', '.join(differing_keys(old, self.stamp))}); use another output or "
                          "delete it")

    def done(self, inputs: Sequence[Row], key: Key) -> int:
        """How many leading input rows are already written (a torn last line is dropped); records the stamp."""
        self._check_stamp()
        good: list[str] = []
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").split("\n")
            complete, torn = lines[:-1], lines[-1]  # text after the last newline is a torn write
            fn = _key_fn(key)
            for i, line in enumerate(complete):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{self.path}: line {i + 1}: invalid JSON in an earlier output; delete the "
                                    "file") from None
                if i >= len(inputs) or not isinstance(row, dict) or fn(row) != fn(inputs[i]):
                    raise DataError(f"{self.path}: line {i + 1}: does not match input row {i + 1}; was it written "
                                    "for another input? delete it to start over")
                good.append(line)
            if torn:
                self.path.write_text("".join(x + "\n" for x in good), encoding="utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self.stamp_path.write_text(json.dumps({"what": self.what, "stamp": self.stamp, "info": self.info},
                                              indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.count = len(good)
        return self.count

    def append(self, rows: Iterable[Row]) -> None:
        """Write rows after the existing ones and flush (call done() first)."""
        if self.count is None:
            raise RuntimeError(f"{self.path}: call done() before append()")
        with open(self.path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=self.ensure_ascii) + "\n")
                self.count += 1
            fh.flush()

    def reset(self) -> None:
        """Discard every written row (the stamp stays), e.g. to rewrite a partial file in one piece."""
        self.path.write_text("", encoding="utf-8")
        self.count = 0

    def rows(self) -> list[Row]:
        """Every complete row written so far."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").split("\n")[:-1]]
