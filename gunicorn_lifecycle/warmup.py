"""The warm-up gate: a new worker proves it serves before it counts as booted (SPEC section 8).

A release can import and still fail to serve (Django loads views lazily, a
template or a database setting breaks the first request). With
``configure(warmup="/healthz")`` each new worker requests that path through its
own loaded application, in-process, before its boot completes: WSGI or ASGI
alike, any status but 2xx failing. ``configure(warmup=callable)`` calls it with
Gunicorn's worker object instead; raising fails. A failure fails the worker's
boot as Gunicorn's own boot errors do: a new ``USR2`` master halts (``upgrade``
rolls back with the old release serving), a cold start fails loudly.

An ASGI application is called in an event loop of its own, before the worker's
server has run its lifespan startup: the path should answer without it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from typing import Any

Warmup = str | Callable[[Any], object]


class WarmupFailed(Exception):
    """The worker did not prove it serves: the message says what it answered or raised."""


def prove(target: Warmup, app: Any, worker: Any) -> None:
    """Warm ``worker`` up with ``target``: a path requested through ``app``, or a callable
    given the worker. WarmupFailed, saying why, when it does not serve."""
    if not isinstance(target, str):
        try:
            target(worker)
        except Exception as exc:
            raise WarmupFailed(f"warm-up {_name(target)} raised {type(exc).__name__}: {exc}"
                               ) from exc
        return
    try:
        status = _asgi(app, target) if _is_asgi(app) else _wsgi(app, target)
    except Exception as exc:
        raise WarmupFailed(f"warm-up GET {target} raised {type(exc).__name__}: {exc}") from exc
    if not 200 <= int(status.split()[0]) < 300:
        raise WarmupFailed(f"warm-up GET {target} answered {status}")


def _is_asgi(app: Any) -> bool:
    """An ASGI application is a coroutine function, or an object whose call is one."""
    import inspect  # here: only a worker with a warm-up path pays for it

    call = type(app).__call__ if not inspect.isroutine(app) else None  # an object's own call
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call)


def _wsgi(app: Callable[..., Iterable[bytes]], target: str) -> str:
    """The status line a WSGI ``app`` answers ``GET target`` with (its body read and closed)."""
    path, _, query = target.partition("?")
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_NAME": "localhost", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "localhost", "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    answered: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                       ) -> Callable[[bytes], None]:
        answered[:] = [status]
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if not answered:
        raise RuntimeError("the application never called start_response")
    return answered[0]


def _asgi(app: Callable[..., Any], target: str) -> str:
    """The status an ASGI ``app`` answers ``GET target`` with, in a loop of its own."""
    import asyncio  # here: only an ASGI worker with a warm-up path pays for it

    path, _, query = target.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "GET", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"localhost")], "server": ("localhost", 80),
        "client": ("127.0.0.1", 0),
    }
    answered: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answered[:] = [int(message["status"])]

    loop = asyncio.new_event_loop()  # never the worker's own, which its server sets up later
    try:
        loop.run_until_complete(app(scope, receive, send))
    finally:
        loop.close()
    if not answered:
        raise RuntimeError("the application sent no response")
    return str(answered[0])


def _name(target: Callable[[Any], object]) -> str:
    return getattr(target, "__qualname__", None) or repr(target)
