"""The event every callback receives, and how a callback is run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .options import Callback, Options


@dataclass(frozen=True, slots=True)
class Event:
    """What happened, to whom, and how many workers each generation has right now.

    Counts are read under the lock at the moment of the event; ``n_prev`` and
    ``n_next`` are None when no older (newer) generation is open.
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


class Log(Protocol):
    """The part of Gunicorn's logger (or a ``logging.Logger``) this library uses."""

    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object) -> None: ...
    def exception(self, msg: str, *args: object) -> None: ...


def run_callback(name: str, event: Event, options: Options, log: Log) -> None:
    """Run the user's ``name`` callback; a failure is logged or re-raised per ``on_error``."""
    callback: Callback | None = getattr(options, name)
    if callback is None:
        return
    try:
        callback(event)
    except Exception:
        if options.on_error == "raise":
            raise
        log.exception("gunicorn_lifecycle: the %s callback raised (event id=%s reason=%s)",
                      name, event.id, event.reason)
