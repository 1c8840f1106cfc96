"""Know whether Gunicorn is starting, reloading, upgrading or stopping.

Wire :func:`configure` and the seven hooks into ``gunicorn.conf.py``; every
callback then gets one :class:`Event`, run once, under one lock shared by all
masters and workers of the instance.
"""

from .errors import LifecycleError
from .events import Event
from .hooks import (
    child_exit,
    configure,
    on_exit,
    on_reload,
    on_starting,
    post_fork,
    post_worker_init,
    worker_exit,
)

__version__ = "0.1.0"

__all__ = [
    "Event",
    "LifecycleError",
    "__version__",
    "child_exit",
    "configure",
    "on_exit",
    "on_reload",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "worker_exit",
]
