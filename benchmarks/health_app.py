"""The deploy benchmark's application: the example app, with ``/healthz`` answering 500 while
the file ``$BENCH_BROKEN`` exists (a release that imports but cannot serve), and an import
that takes ``$BENCH_SLOW_BOOT`` seconds while that file exists (a long boot)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from example_app.app import app as example

_SLOW = os.environ.get("BENCH_SLOW_BOOT", "/nonexistent")
if os.path.exists(_SLOW):
    with open(_SLOW) as seconds:
        time.sleep(float(seconds.read() or 5))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/healthz" and os.path.exists(
            os.environ.get("BENCH_BROKEN", "/nonexistent")):
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"broken\n"]
    return example(environ, start_response)
