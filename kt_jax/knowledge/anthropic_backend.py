"""The Anthropic backend: Messages API with a forced tool call per operation (the tool's input schema is the output
schema), validated with retry-then-reject, behind the shared sqlite cache.

- Transport: the SDK's own retries (`max_retries`) handle 408/409/429/5xx/529, connection errors and timeouts,
  honouring `retry-after(-ms)`; after they are exhausted the item is rejected with the reason (and cached as such).
  Authentication / bad-request errors abort the run (`FatalBackendError`): retrying or rejecting would hide them.
- Content: a truncated answer (`stop_reason == "max_tokens"`), a reply without the tool call, a body that is not
  valid JSON, or tool input failing the schema is retried (`validation_retries`; each retry doubles `max_tokens`),
  then rejected with the reason.
- Concurrency: at most `workers` requests in flight (semaphore) and at most `requests_per_minute` started per minute.
- Prompt caching: the shared system instructions and the operation's instructions are marked `cache_control`.
- Batches (`batch=True`): `prefetch` submits every uncached request of an operation as a Message Batch, stores the
  batch id in the cache BEFORE waiting, polls, collects into the cache, and resubmits invalid items up to
  `validation_retries` times; after a crash the same job finds its batch id and collects it instead of resubmitting.
- Accounting: tokens in/out/cache-write/cache-read and dollars at configurable per-million-token prices (batch
  requests at `batch_discount`), in `summary()`. A local server costs nothing: when `local` is true, or when it is
  left unset and `base_url` names a loopback or private-network host (localhost, 127.x, ::1, 10.x, 192.168.x,
  172.16-31.x), every price not given explicitly is 0; otherwise the unset prices are Claude Sonnet's list prices.
  Local servers (vLLM, llama.cpp, Ollama) ignore the API key, so none is required there.
The API key is read from the environment variable `api_key_env` (or passed as `api_key`), is never logged,
cached or written, and is scrubbed from every error message this module raises.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kt_jax.errors import ConfigError
from kt_jax.knowledge import prompts
from kt_jax.knowledge.backend import CachedBackend, CallFailed, FatalBackendError
from kt_jax.knowledge.cache import KnowledgeCache

log = logging.getLogger("kt_jax.knowledge")
DEFAULT_MODEL = "claude-sonnet-4-6"  # any Messages-API model name; set `model` in the config
# USD per million tokens (Claude Sonnet list prices): input, output, cache write (5 min), cache read
API_PRICES = {"input_tokens": 3.0, "output_tokens": 15.0, "cache_creation_input_tokens": 3.75,
              "cache_read_input_tokens": 0.30}
LOCAL_KEY = "local-server"  # sent when a local server needs no key (the SDK refuses to start without one)


def is_local_url(base_url: str | None) -> bool:
    """Whether `base_url` names this machine or a private-network host (a self-hosted server, not a paid API)."""
    host = urlsplit(base_url or "").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


class RateLimiter:
    """Spaces request starts so that at most `per_minute` begin in any minute (0 = unlimited); thread-safe."""

    def __init__(self, per_minute: float = 0.0):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next request may start."""
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class Usage:
    """Token counts and cost at per-million-token prices (thread-safe)."""

    def __init__(self, prices: dict[str, float], batch_discount: float):
        self.prices, self.batch_discount = prices, batch_discount
        self.tokens = {k: 0 for k in prices}
        self.dollars = 0.0
        self._lock = threading.Lock()

    def add(self, usage: Any, batch: bool = False) -> None:
        """Add one response's `usage` object."""
        got = {k: int(getattr(usage, k, 0) or 0) for k in self.prices}
        with self._lock:
            for k, v in got.items():
                self.tokens[k] += v
            cost = sum(v * self.prices[k] for k, v in got.items()) / 1e6
            self.dollars += cost * (self.batch_discount if batch else 1.0)

    def line(self) -> str:
        """One line: tokens per kind and total dollars."""
        t = self.tokens
        return (f"tokens in {t['input_tokens']}, out {t['output_tokens']}, cache write "
                f"{t['cache_creation_input_tokens']}, cache read {t['cache_read_input_tokens']}; "
                f"cost ${self.dollars:.4f}")


class AnthropicBackend(CachedBackend):
    """Knowledge operations through the Anthropic Messages API (see module docstring)."""

    name = "anthropic"

    def __init__(self, model: str = DEFAULT_MODEL, cache: KnowledgeCache | str | Path | bool | None = None, *,
                 api_key: str | None = None, api_key_env: str = "ANTHROPIC_API_KEY", base_url: str | None = None,
                 max_tokens: int = 1024, max_tokens_limit: int = 8192, temperature: float | None = None,
                 timeout: float = 120.0, max_retries: int = 6, workers: int = 8, requests_per_minute: float = 0.0,
                 batch: bool = False, poll_interval: float = 30.0, batch_chunk: int = 10000,
                 price_input: float | None = None, price_output: float | None = None,
                 price_cache_write: float | None = None, price_cache_read: float | None = None,
                 batch_discount: float = 0.5, local: bool | None = None, validation_retries: int = 2,
                 retry_rejects: bool = False):
        import anthropic

        if cache is None:
            cache = Path(os.environ.get("KT_JAX_CACHE", Path.home() / ".cache" / "kt-jax" / "knowledge.sqlite3"))
        super().__init__(model, cache, validation_retries=validation_retries, retry_rejects=retry_rejects)
        self.local = is_local_url(base_url) if local is None else bool(local)
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        self._secret = key or ""
        if not key and not self.local:
            raise ConfigError(f"anthropic backend: no API key (set the environment variable {api_key_env})")
        self.max_tokens, self.max_tokens_limit, self.temperature = int(max_tokens), int(max_tokens_limit), temperature
        self.workers, self.batch, self.poll_interval = int(workers), bool(batch), float(poll_interval)
        self.batch_chunk = int(batch_chunk)
        self.limiter = RateLimiter(requests_per_minute)
        self._slots = threading.BoundedSemaphore(max(1, self.workers))
        given = {"input_tokens": price_input, "output_tokens": price_output,
                 "cache_creation_input_tokens": price_cache_write, "cache_read_input_tokens": price_cache_read}
        prices = {k: float(v) if v is not None else (0.0 if self.local else API_PRICES[k]) for k, v in given.items()}
        self.usage = Usage(prices, batch_discount)
        self._anthropic = anthropic
        self.client = anthropic.Anthropic(api_key=key or LOCAL_KEY, base_url=base_url, timeout=timeout,
                                          max_retries=max_retries)

    def __repr__(self) -> str:
        return f"AnthropicBackend(model={self.model!r})"

    def redact(self, text: str) -> str:
        """`text` with the API key replaced by ***."""
        return text.replace(self._secret, "***") if self._secret else text

    def summary(self) -> str:
        """Call counts plus token usage and cost."""
        where = " (local server)" if self.local else ""
        return f"{super().summary()}; {self.usage.line()}{where}"

    # -- one request -------------------------------------------------------------------------------------------
    def request_params(self, op: str, data: dict[str, Any], attempt: int = 0) -> dict[str, Any]:
        """The Messages API parameters for one call (instructions cached, data delimited, tool forced)."""
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": min(self.max_tokens * 2 ** attempt, self.max_tokens_limit),
            "system": [{"type": "text", "text": prompts.SYSTEM},
                       {"type": "text", "text": prompts.INSTRUCTIONS[op], "cache_control": {"type": "ephemeral"}}],
            "tools": [prompts.tool(op)],
            "tool_choice": {"type": "tool", "name": prompts.tool_name(op)},
            "messages": [{"role": "user", "content": prompts.encode_data(data)}],
        }
        if self.temperature is not None:
            params["temperature"] = float(self.temperature)
        return params

    def tool_input(self, op: str, message: Any) -> dict[str, Any]:
        """The forced tool call's input, or ValueError (truncated / no tool call)."""
        if getattr(message, "stop_reason", None) == "max_tokens":
            raise ValueError("answer truncated at max_tokens")
        for block in getattr(message, "content", None) or []:
            if getattr(block, "type", None) == "tool_use" and block.name == prompts.tool_name(op):
                return block.input if isinstance(block.input, dict) else {"_": block.input}
        raise ValueError(f"no {prompts.tool_name(op)} tool call in the reply")

    def _compute(self, op: str, data: dict[str, Any], attempt: int) -> dict[str, Any]:
        api = self._anthropic
        self.limiter.wait()
        with self._slots:
            try:
                params = self.request_params(op, data, attempt)
                extra = {k: params.pop(k) for k in ("temperature",) if k in params}  # not a typed SDK argument
                message = self.client.messages.create(**params, extra_body=extra or None)
            except (api.AuthenticationError, api.PermissionDeniedError, api.BadRequestError,
                    api.NotFoundError) as e:
                raise FatalBackendError(self.redact(f"anthropic {op}: HTTP {e.status_code}: {e}")) from None
            except api.APIStatusError as e:
                raise CallFailed(self.redact(f"HTTP {e.status_code} after retries: {type(e).__name__}")) from None
            except api.APITimeoutError:
                raise CallFailed("request timed out after retries") from None
            except api.APIConnectionError as e:
                raise CallFailed(self.redact(f"connection failed after retries: {e}")) from None
            except (ValueError, api.APIResponseValidationError) as e:  # a 200 whose body is not a valid Message
                raise ValueError(self.redact(f"malformed response: {type(e).__name__}: {str(e)[:120]}")) from None
        self.usage.add(message.usage)
        return self.tool_input(op, message)

    # -- Message Batches ---------------------------------------------------------------------------------------
    def prefetch(self, op: str, datas: Sequence[dict[str, Any]]) -> None:
        """In batch mode, answer every uncached input of `op` through Message Batches (resumable by batch id)."""
        if not self.batch or self.cache is None:
            return
        unique = {self.key(op, d): d for d in datas}
        job_base = hashlib.sha256((op + "|" + ",".join(sorted(unique))).encode()).hexdigest()[:32]
        for i in range(0, len(unique), self.batch_chunk):
            keys = sorted(unique)[i:i + self.batch_chunk]
            self._batch_job(op, {k: unique[k] for k in keys}, f"{job_base}:{i}")

    def _batch_job(self, op: str, items: dict[str, dict[str, Any]], job: str) -> None:
        # Round r's batch id is saved before waiting and kept until the whole job ends, so a resumed job replays
        # every round by id (collecting again is idempotent) and submits only rounds that never started.
        reasons: dict[str, str] = {}
        rounds = [f"{job}:{attempt}" for attempt in range(self.validation_retries + 1)]
        for attempt, round_job in enumerate(rounds):
            found = self.cache.find_batch(round_job)
            pending = {k: d for k, d in items.items() if self.cached(op, d) is None}
            if found is None and not pending:
                break
            if found is None:
                requests = [{"custom_id": k[:64], "params": self.request_params(op, d, attempt)}
                            for k, d in pending.items()]
                batch = self._api(lambda reqs=requests: self.client.messages.batches.create(requests=reqs), "create")
                self.cache.save_batch(round_job, batch.id, list(pending))
                log.info("submitted message batch %s (%d %s requests)", batch.id, len(pending), op)
                batch_id = batch.id
            else:
                batch_id = found[0]
                log.info("resuming message batch %s for %s", batch_id, op)
            reasons.update(self._collect(op, items, batch_id))
        for k, d in items.items():
            if self.cached(op, d) is None:
                self.store_reject(op, d, f"batch: {reasons.get(k, 'no result')} (after "
                                         f"{self.validation_retries + 1} rounds)")
        for round_job in rounds:
            self.cache.drop_batch(round_job)

    def _api(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except self._anthropic.APIError as e:
            raise FatalBackendError(self.redact(f"anthropic batch {what}: {type(e).__name__}: {e}")) from None

    def _collect(self, op: str, items: dict[str, dict[str, Any]], batch_id: str) -> dict[str, str]:
        while True:
            batch = self._api(lambda: self.client.messages.batches.retrieve(batch_id), "retrieve")
            if batch.processing_status == "ended":
                break
            time.sleep(self.poll_interval)
        by_id = {k[:64]: (k, d) for k, d in items.items()}
        reasons: dict[str, str] = {}
        for entry in self._api(lambda: list(self.client.messages.batches.results(batch_id)), "results"):
            if entry.custom_id not in by_id:
                continue
            key, data = by_id[entry.custom_id]
            result = entry.result
            if result.type != "succeeded":
                reasons[key] = f"result {result.type}"
                continue
            self.usage.add(result.message.usage, batch=True)
            self.stats.add("computed")
            try:
                self.store(op, data, self.tool_input(op, result.message))
            except ValueError as e:
                reasons[key] = self.redact(str(e))
                self.stats.add("retries")
        return reasons

