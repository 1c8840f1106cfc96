"""The example app with prometheus_client metrics in multiprocess mode (see README's recipe)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge

REQUESTS = Counter("example_requests", "Requests served")
LIVE = Gauge("example_live_workers", "Workers alive", multiprocess_mode="livesum")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    REQUESTS.inc()
    LIVE.set(1)
    body = f"counted by worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
