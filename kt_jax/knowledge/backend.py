"""The knowledge backend interface, the cached/validated call path every backend shares, and map helpers.

Backends (`offline.py`, `anthropic_backend.py`) subclass `CachedBackend`; `registry.make_backend(kind, **options)`
builds one by name, so dependencies run one way: registry -> backends -> this module. Every operation goes through
`CachedBackend.call`: cache lookup -> `_compute` (the backend's raw tool answer) -> schema validation (a malformed
answer is retried up to `validation_retries` times, then rejected with the reason) -> cache write -> result.
A rejection raises `Rejected` (a `BackendError`) and is cached too, so re-runs make no call for it.

Map helpers for many items (bounded thread pool, per-item outcome, nothing dropped):
- `map_outcomes(fn, items, workers, progress)` -> list[Outcome] (value or error reason per item, input order).
- `call_many(backend, op, datas, workers, progress)` -> list[Outcome]; uses the backend's `prefetch`
  (the Anthropic Message Batches mode) first when the backend has one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kt_jax.errors import BackendError
from kt_jax.knowledge import prompts
from kt_jax.knowledge.cache import KnowledgeCache, cache_key


@runtime_checkable
class KnowledgeBackend(Protocol):
    """The operations KnowTuning needs from an LLM; the prompts and output schemas are in `knowledge/prompts.py`."""

    def extract(self, question: str, answer: str) -> list[str]: ...
    def rewrite(self, question: str, facts: list[str]) -> tuple[str, str]: ...
    def revise(self, question: str, facts: list[str]) -> list[str]: ...
    def rephrase(self, question: str, answer: str) -> str: ...
    def combine(self, question: str, facts: list[str]) -> str: ...
    def judge(self, question: str, reference: str, answer_a: str, answer_b: str) -> dict[str, str]: ...
    def verify(self, question: str, fact: str, reference: str) -> bool: ...
    def label_fact(self, question: str, fact: str, reference: str) -> str: ...


class Rejected(BackendError):
    """An item the backend could not answer validly (after retries); `reason` says why."""

    def __init__(self, op: str, reason: str):
        super().__init__(f"{op}: rejected: {reason}")
        self.op, self.reason = op, reason


class CallFailed(BackendError):
    """A request failed for good after the transport's own retries; the item is rejected with this reason."""


class FatalBackendError(BackendError):
    """A failure that concerns every item (authentication, a bad request): the run stops instead of rejecting."""


class CallStats:
    """Thread-safe counters: cache hits, computed calls, retries, rejections (per operation)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        """Increment counter `name`."""
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def get(self, name: str) -> int:
        """Current value of counter `name`."""
        return self.counts.get(name, 0)


class CachedBackend:
    """Base class: the operations of `prompts.OPS` as cached, validated calls of `_compute(op, data, attempt)`."""

    name = "base"

    def __init__(self, model: str, cache: KnowledgeCache | str | Path | bool | None = None, *,
                 validation_retries: int = 2, retry_rejects: bool = False):
        self.model = model
        self.cache = KnowledgeCache(cache) if isinstance(cache, str | Path) else (cache or None)
        self.validation_retries = int(validation_retries)
        self.retry_rejects = bool(retry_rejects)
        self.stats = CallStats()

    # -- subclasses -------------------------------------------------------------------------------------------
    def _compute(self, op: str, data: dict[str, Any], attempt: int) -> dict[str, Any]:
        """The raw tool answer for `op` on `data` (attempt 0, 1, ... on retries); raise ValueError if malformed."""
        raise NotImplementedError

    def cache_identity(self) -> str:
        """The model part of the cache key (subclasses add whatever else changes answers)."""
        return self.model

    def prefetch(self, op: str, datas: Sequence[dict[str, Any]]) -> None:
        """Fill the cache for many inputs at once (batch APIs); the default does nothing."""

    def summary(self) -> str:
        """One line of call counts (and cost, for paid backends)."""
        c = self.stats.counts
        return (f"{self.name} ({self.model}): {c.get('computed', 0)} calls, {c.get('cache_hits', 0)} cache hits, "
                f"{c.get('retries', 0)} retries, {c.get('rejected', 0)} rejected")

    # -- the shared call path ---------------------------------------------------------------------------------
    def key(self, op: str, data: dict[str, Any]) -> str:
        """The cache key of one call."""
        return cache_key(self.name, self.cache_identity(), prompts.op_version(op), op, data)

    def cached(self, op: str, data: dict[str, Any]) -> tuple[str, Any] | None:
        """The cached ("ok", answer) / ("rejected", reason) of a call, or None if it has not finished."""
        if self.cache is None:
            return None
        hit = self.cache.get(self.key(op, data))
        if hit is not None and hit[0] == "rejected" and self.retry_rejects:
            return None
        return hit

    def store(self, op: str, data: dict[str, Any], raw: Any) -> Any:
        """Validate a raw answer, commit it to the cache, return the parsed value; raise ValueError if invalid."""
        prompts.validate(op, data, raw)
        if self.cache is not None:
            self.cache.put(self.key(op, data), op, raw)
        return prompts.parse(op, raw)

    def store_reject(self, op: str, data: dict[str, Any], reason: str) -> Rejected:
        """Commit a rejection to the cache and return the exception to raise."""
        self.stats.add("rejected")
        if self.cache is not None:
            self.cache.reject(self.key(op, data), op, reason)
        return Rejected(op, reason)

    def call(self, op: str, data: dict[str, Any]) -> Any:
        """Run one operation through cache -> compute -> validate (retry) -> cache."""
        if op not in prompts.OPS:
            raise BackendError(f"unknown knowledge operation {op!r}; choose from {prompts.OPS}")
        hit = self.cached(op, data)
        if hit is not None:
            self.stats.add("cache_hits")
            if hit[0] == "ok":
                return prompts.parse(op, hit[1])
            raise Rejected(op, hit[1])
        reason = ""
        for attempt in range(self.validation_retries + 1):
            if attempt:
                self.stats.add("retries")
            try:
                raw = self._compute(op, data, attempt)
                self.stats.add("computed")
                return self.store(op, data, raw)
            except ValueError as e:
                self.stats.add("computed")
                reason = str(e)
            except CallFailed as e:
                raise self.store_reject(op, data, str(e)) from None
        raise self.store_reject(op, data, f"invalid answer after {self.validation_retries + 1} attempts: {reason}")

    # -- the interface ----------------------------------------------------------------------------------------
    def extract(self, question: str, answer: str) -> list[str]:
        """The atomic facts of `answer`."""
        return self.call("extract", {"question": question, "answer": answer})

    def rewrite(self, question: str, facts: list[str]) -> tuple[str, str]:
        """A fine-grained (question, answer) about the difficult `facts`."""
        return self.call("rewrite", {"question": question, "facts": list(facts)})

    def revise(self, question: str, facts: list[str]) -> list[str]:
        """The same number of facts, each minimally changed to be false."""
        return self.call("revise", {"question": question, "facts": list(facts)})

    def rephrase(self, question: str, answer: str) -> str:
        """`answer` in other words."""
        return self.call("rephrase", {"question": question, "answer": answer})

    def combine(self, question: str, facts: list[str]) -> str:
        """One fluent answer made of `facts` in order."""
        return self.call("combine", {"question": question, "facts": list(facts)})

    def judge(self, question: str, reference: str, answer_a: str, answer_b: str) -> dict[str, str]:
        """{aspect: "A" | "B" | "tie"} for completeness, factuality and logicality."""
        return self.call("judge", {"question": question, "reference": reference, "answer_a": answer_a,
                                   "answer_b": answer_b})

    def verify(self, question: str, fact: str, reference: str) -> bool:
        """Whether `fact` is supported by `reference`."""
        return self.call("verify", {"question": question, "fact": fact, "reference": reference})

    def label_fact(self, question: str, fact: str, reference: str) -> str:
        """"supported" | "contradicted" | "not_verifiable": `fact` against `reference` and the judge's knowledge."""
        return self.call("label_fact", {"question": question, "fact": fact, "reference": reference})


@dataclass
class Outcome:
    """One item's result: `value` if it succeeded, else `error` (the reason)."""

    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the item succeeded."""
        return self.error is None


def map_outcomes(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int = 4,
                 progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """`fn` over `items` on a bounded thread pool; a BackendError becomes that item's error, in input order."""

    def one(item: Any) -> Outcome:
        try:
            out = Outcome(value=fn(item))
        except Rejected as e:
            out = Outcome(error=f"{e.op}: {e.reason}")
        except FatalBackendError:
            raise
        except BackendError as e:
            out = Outcome(error=str(e))
        if progress is not None:
            progress(1)
        return out

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        return list(pool.map(one, items))


def call_many(backend: Any, op: str, datas: Sequence[dict[str, Any]], *, workers: int = 4,
              progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Run `op` on every input (prefetching through the backend's batch mode if it has one)."""
    prefetch = getattr(backend, "prefetch", None)
    if prefetch is not None:
        prefetch(op, datas)
    return map_outcomes(lambda d: backend.call(op, d), datas, workers=workers, progress=progress)

