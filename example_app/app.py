"""A small app for Gunicorn with the lifecycle hooks: WSGI (``app``) and ASGI (``asgi_app``).

``GET /spin?seconds=N`` computes for N seconds without ever yielding, holding
the GIL as a CPU-bound request does (a worker busy, not dead); ``GET
/sleep?seconds=N`` waits N seconds, as a request on a slow backend does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any


def _body() -> bytes:
    return f"hello from worker {os.getpid()}\n".encode()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    seconds = float(environ.get("QUERY_STRING", "").partition("=")[2] or 1)
    if environ.get("PATH_INFO") == "/spin":
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            pass
    elif environ.get("PATH_INFO") == "/sleep":
        time.sleep(seconds)
    body = _body()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = _body()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
