"""A local fake of the Anthropic Messages API (and Message Batches) on 127.0.0.1, for tests without network.

The "model" behind it answers every tool call with the offline backend's rules applied to the request's `<data>`
block, so answers are valid and deterministic. Faults can be injected at a rate (seeded): HTTP 429 / 529 with
`retry-after-ms` (+ `retry-after`), 500, timeouts (the reply is held longer than the client waits), malformed JSON
bodies, truncated answers (`stop_reason: "max_tokens"`), and answers that break the tool schema. It simulates
prompt caching in its usage numbers and records what it saw (calls per operation and data key, batch creations,
the API keys presented), so tests can assert "no repeated calls" and "never resubmitted".

A naive-model hook makes the prompt-injection test meaningful: text in the user turn OUTSIDE the first
`<data>`...`</data>` block that says "return N facts" is obeyed, as a gullible model would. If a row's text could
close the data block, its instructions would leak out and change the answer.

Usage: `with FakeAnthropicServer(api_key="k", fault_rate=0.3) as server: make_backend("anthropic",
base_url=server.url, ...)`. The judge tests use it too (op "judge" is answered).

Why it lives in tests/helpers and not in the package: it is test scaffolding. Its "model" is the offline rules, it
reaches into the offline backend's private `_compute`, and its value is fault injection and call bookkeeping that
only tests assert on. A user checking their own `base_url` set-up (a proxy, a gateway) needs the real endpoint, and
a user who wants answers without a network has `backend=offline`; neither is served by shipping an HTTP server in
the library (it was imported by nothing but tests).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kt_jax.knowledge import prompts

FAULTS = ("429", "529", "500", "timeout", "malformed", "truncated", "bad_schema")


class FakeAnthropicServer:
    """Threaded HTTP server speaking enough of the Messages and Batches API for the SDK (see module doc)."""

    def __init__(self, api_key: str = "sk-ant-fake-key", *, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 seed: int = 0, timeout_sleep: float = 1.0, hold_batches: bool = False):
        from kt_jax.knowledge.offline import OfflineBackend

        self.api_key, self.fault_rate, self.faults = api_key, fault_rate, tuple(faults)
        self.timeout_sleep, self.hold_batches = timeout_sleep, hold_batches
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rules = OfflineBackend()
        self.calls: Counter = Counter()          # (op, data json) -> number of model calls
        self.fault_counts: Counter = Counter()   # fault kind -> times injected
        self.keys_seen: Counter = Counter()
        self.http_requests: Counter = Counter()  # "POST /v1/messages", ... -> count (every HTTP request)
        self.batch_creates = 0
        self.batches: dict[str, dict[str, Any]] = {}
        self._cached_prefixes: set[str] = set()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL to pass to the SDK."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FakeAnthropicServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def release_batches(self) -> None:
        """Let held batches finish (they report `ended` from now on)."""
        self.hold_batches = False

    # -- the model ---------------------------------------------------------------------------------------------
    def _fault(self) -> str | None:
        with self._lock:
            if self.fault_rate and self._rng.random() < self.fault_rate:
                kind = self._rng.choice(self.faults)
                self.fault_counts[kind] += 1
                return kind
            return None

    def answer(self, params: dict[str, Any], fault: str | None = None) -> dict[str, Any]:
        """The Message object for a request (with a content-level fault applied if given)."""
        name = params.get("tool_choice", {}).get("name", "")
        op = name.removeprefix("submit_")
        msgs = params.get("messages") or [{}]
        content = msgs[-1].get("content", "")
        text = content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
        with self._lock:
            self.calls[(op, text)] += 1
        outside = re.sub(r"<data>.*?</data>", "", text, count=1, flags=re.S)
        obey = re.search(r"return (\d+) facts", outside, re.I)
        if obey and op == "extract":  # the naive model follows instructions that escaped the data block
            tool_input: dict[str, Any] = {"facts": ["HACKED"] * int(obey.group(1))}
        else:
            tool_input = self._rules._compute(op, prompts.decode_data(text), 0)
        stop = "tool_use"
        if fault == "truncated":
            tool_input, stop = {k: (v[:1] if isinstance(v, list) else str(v)[:3]) for k, v in
                                list(tool_input.items())[:1]}, "max_tokens"
        elif fault == "bad_schema":
            tool_input = {"result": json.dumps(tool_input)}
        system = json.dumps(params.get("system", ""), sort_keys=True) + json.dumps(params.get("tools"))
        with self._lock:
            hit = system in self._cached_prefixes
            self._cached_prefixes.add(system)
        prefix_tokens = len(system) // 4
        usage = {"input_tokens": len(text) // 4 + 10, "output_tokens": len(json.dumps(tool_input)) // 4 + 5,
                 "cache_creation_input_tokens": 0 if hit else prefix_tokens,
                 "cache_read_input_tokens": prefix_tokens if hit else 0}
        return {"id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant",
                "model": params.get("model", "fake"), "stop_reason": stop, "stop_sequence": None, "usage": usage,
                "content": [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name,
                             "input": tool_input}]}

    def _batch_object(self, batch_id: str) -> dict[str, Any]:
        b = self.batches[batch_id]
        ended = not self.hold_batches
        n = len(b["requests"])
        return {"id": batch_id, "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": {"processing": 0 if ended else n, "succeeded": n if ended else 0, "errored": 0,
                                   "canceled": 0, "expired": 0},
                "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
                "ended_at": "2026-01-01T00:01:00Z" if ended else None, "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{batch_id}/results" if ended else None}

    def _batch_results(self, batch_id: str) -> str:
        b = self.batches[batch_id]
        if b.get("results") is None:
            lines = []
            for req in b["requests"]:
                fault = self._fault()
                if fault in ("429", "529", "500", "timeout", "malformed"):
                    result: dict[str, Any] = {"type": "errored", "error": {"type": "error", "error": {
                        "type": "api_error", "message": f"injected {fault}"}}}
                else:
                    result = {"type": "succeeded", "message": self.answer(req["params"], fault)}
                lines.append(json.dumps({"custom_id": req["custom_id"], "result": result}))
            b["results"] = "\n".join(lines) + "\n"
        return b["results"]

    # -- HTTP --------------------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: str, headers: dict[str, str] | None = None,
                      ctype: str = "application/json") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(data)

            def _error(self, status: int, kind: str, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps({"type": "error", "error": {"type": kind, "message": kind}}), headers)

            def _auth(self) -> bool:
                with server._lock:
                    server.http_requests[f"{self.command} {re.sub(r'msgbatch_[0-9a-f]+', '{id}', self.path)}"] += 1
                key = self.headers.get("x-api-key") or self.headers.get("authorization", "").removeprefix("Bearer ")
                with server._lock:
                    server.keys_seen[key] += 1
                if key != server.api_key:  # echoes the key, as a careless proxy might: tests check redaction
                    self._send(401, json.dumps({"type": "error", "error": {
                        "type": "authentication_error", "message": f"invalid x-api-key: {key}"}}))
                    return False
                return True

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not self._auth():
                    return
                if self.path.startswith("/v1/messages/batches"):
                    batch_id = f"msgbatch_{uuid.uuid4().hex[:16]}"
                    with server._lock:
                        server.batch_creates += 1
                        server.batches[batch_id] = {"requests": body["requests"], "results": None}
                    self._send(200, json.dumps(server._batch_object(batch_id)))
                    return
                if not self.path.startswith("/v1/messages"):
                    self._error(404, "not_found_error")
                    return
                fault = server._fault()
                if fault in ("429", "529"):
                    kind = "rate_limit_error" if fault == "429" else "overloaded_error"
                    self._error(int(fault), kind, {"retry-after-ms": "5", "retry-after": "0.005"})
                elif fault == "500":
                    self._error(500, "api_error")
                elif fault == "timeout":
                    server._stop.wait(server.timeout_sleep)
                    self._send(200, json.dumps(server.answer(body)))
                elif fault == "malformed":
                    self._send(200, json.dumps(server.answer(body))[:40])
                else:
                    self._send(200, json.dumps(server.answer(body, fault)))

            def do_GET(self) -> None:
                if not self._auth():
                    return
                m = re.fullmatch(r"/v1/messages/batches/([A-Za-z0-9_]+)(/results)?", self.path.split("?")[0])
                if not m or m.group(1) not in server.batches:
                    self._error(404, "not_found_error")
                elif m.group(2):
                    self._send(200, server._batch_results(m.group(1)), ctype="application/binary")
                else:
                    self._send(200, json.dumps(server._batch_object(m.group(1))))

        return Handler
