"""Serving under load: a bound on the generation requests in flight (429 with ``Retry-After``),
request ids, and Prometheus metrics, as one plain ASGI middleware.

- **Admission**: chats, completions and embeddings in flight (queued, generating or streaming)
  are counted; past ``ServerConfig.max_pending`` a new one is answered at once with 429
  ``rate_limit_exceeded`` and ``Retry-After`` (seconds, from the recent time per batch and the
  queue's length), which the ``openai`` client honours when it retries. Other routes (health,
  users, memories) are never refused, so they stay responsive while generation is saturated.
- **Request id**: a client's ``X-Request-Id`` (printable ASCII, at most 128 characters) is
  echoed; otherwise one is made (``req_<32 hex>``). Every response carries it, and the server
  log's error lines name it.
- **Metrics**: ``GET /metrics`` in Prometheus' text format from a registry of this app's own
  (nothing registers at import): requests by method, route template and status, latency by
  route, requests in flight, 429s, and the batcher's batch sizes.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

from personalign.server.errors import error_body

GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
REQUEST_ID = "x-request-id"
_PRINTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` when it is printable ASCII of at most 128 characters, else a new one."""
    given = dict(headers).get(REQUEST_ID.encode())
    if given is not None:
        text = given.decode("latin-1")
        if _PRINTABLE_ID.match(text):
            return text
    return f"req_{uuid.uuid4().hex}"


def retry_after(pending: int, max_batch: int, seconds_per_batch: float) -> int:
    """Whole seconds until about ``pending`` requests have run, ``max_batch`` per batch (at least 1)."""
    return max(1, math.ceil(math.ceil(pending / max_batch) * seconds_per_batch))


class Metrics:
    """This app's Prometheus registry (``prometheus_client`` is imported when the app is built)."""

    def __init__(self, batcher: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "personalign_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "personalign_request_seconds",
            "Time to the end of the response",
            ["route"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "personalign_generation_in_flight",
            "Chats, completions and embeddings in flight",
            registry=self.registry,
        )
        self.rejected = Counter(
            "personalign_rejected", "Generation requests refused with 429", registry=self.registry
        )
        batches = Gauge("personalign_batches", "Generation batches run", registry=self.registry)
        batches.set_function(lambda: float(sum(batcher.stats.sizes.values())))
        mean = Gauge("personalign_batch_size_mean", "Mean rows per batch", registry=self.registry)
        mean.set_function(lambda: float(batcher.stats.snapshot()["mean_batch_size"]))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Serving:
    """ASGI middleware: admission control for generation routes, request ids and metrics."""

    def __init__(self, app: Any, max_pending: int, batcher: Any, metrics: Metrics) -> None:
        self.app = app
        self.max_pending = max_pending
        self.batcher = batcher
        self.metrics = metrics
        self.pending = 0  # only touched on the event loop thread

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope.get("headers") or [])
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        generating = scope["method"] == "POST" and scope["path"] in GENERATING

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID.encode(), rid.encode())]
            await send(message)

        started = time.perf_counter()
        if generating and self.pending >= self.max_pending:
            await self._reject(send_with_id)
            self.metrics.requests.labels(scope["method"], scope["path"], "429").inc()
            return
        if generating:
            self.pending += 1
            self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if generating:
                self.pending -= 1
                self.metrics.inflight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _reject(self, send: Any) -> None:
        import json

        self.metrics.rejected.inc()
        wait = retry_after(self.pending, self.batcher.max_batch, self.batcher.stats.seconds_per_batch())
        message = f"{self.pending} generation requests are in flight, the server's limit. Fix: retry after {wait} s (Retry-After)"
        body = json.dumps(error_body(429, message, "rate_limit_exceeded")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(wait).encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
