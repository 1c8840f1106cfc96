"""The event every callback receives, and how the callbacks of one event are run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from .options import Callback, OnError

# A callback running longer holds up every other process's callbacks: it is logged.
SLOW_CALLBACK = 1.0


class CallbackFailed(Exception):
    """A user callback raised under ``on_error="raise"``; carries the original error to the hook."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


@dataclass(frozen=True, slots=True)
class Event:
    """What happened, to whom, and how many workers each generation has right now.

    Counts are read under the lock at the moment of the event; ``n_prev`` and
    ``n_next`` are None when no older (newer) generation is open. ``term`` is the
    leadership term of leader events, else None.
    """

    id: str
    n_prev: int | None
    n_mine: int
    n_next: int | None
    reason: str
    generation: int
    pid: int
    server: Any = None
    worker: Any = None
    term: int | None = None


class Log(Protocol):
    """The part of Gunicorn's logger (or a ``logging.Logger``) this library uses."""

    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object) -> None: ...
    def exception(self, msg: str, *args: object) -> None: ...


def run_callbacks(name: str, callbacks: tuple[Callback, ...], event: Event, on_error: OnError,
                  log: Log) -> None:
    """Run the ``name`` callbacks in order; a failure is logged, or re-raised per ``on_error``."""
    for callback in callbacks:
        began = time.monotonic()
        try:
            callback(event)
        except Exception as exc:
            if on_error == "raise":
                raise CallbackFailed(exc) from exc
            log.exception("gunicorn_lifecycle: the %s callback %s raised (event id=%s reason=%s)",
                          name, _name(callback), event.id, event.reason)
        finally:
            took = time.monotonic() - began
            if took > SLOW_CALLBACK:
                log.warning("gunicorn_lifecycle: the %s callback %s ran %.1fs, holding up every "
                            "other callback of the node; do slow work outside callbacks (README: "
                            "\"Slow work\")", name, _name(callback), took)


def _name(callback: Callback) -> str:
    return getattr(callback, "__qualname__", None) or repr(callback)
