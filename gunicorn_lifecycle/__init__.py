"""Know whether Gunicorn is starting, reloading, upgrading or stopping.

Wire :func:`configure` and the hooks into ``gunicorn.conf.py``; every callback
then gets one :class:`Event`, run once, with no two callbacks of the instance
running at once.
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
    worker_abort,
    worker_exit,
)

__version__ = "0.2.0"

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
    "worker_abort",
    "worker_exit",
]
