"""Know whether Gunicorn is starting, reloading, upgrading or stopping.

Wire :func:`configure` and the hooks into ``gunicorn.conf.py``; every callback
then gets one :class:`Event`, run once, with no two callbacks of the instance
running at once.

The names are loaded on first use, so that the command line (a health probe
run every few seconds) does not pay for the hooks' imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import LifecycleError
    from .events import Event
    from .hooks import (
        child_exit,
        configure,
        nworkers_changed,
        on_exit,
        on_reload,
        on_starting,
        post_fork,
        post_worker_init,
        worker_abort,
        worker_exit,
    )

__version__ = "0.2.0"

_WHERE = {"LifecycleError": ".errors", "Event": ".events"}

__all__ = [
    "Event",
    "LifecycleError",
    "__version__",
    "child_exit",
    "configure",
    "nworkers_changed",
    "on_exit",
    "on_reload",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "worker_abort",
    "worker_exit",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE.get(name, ".hooks"), __name__), name)
    globals()[name] = value
    return value
