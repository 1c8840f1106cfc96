"""Real OS-thread primitives, whatever gevent or eventlet patched before this import.

A config file that starts with ``monkey.patch_all()`` turns ``_thread`` and
``time.sleep`` into greenlet versions: a heartbeat "thread" would then be a
greenlet the worker's event loop can starve, and a "lock" one that only yields
to it. The originals are taken here, once, at import.
"""

from __future__ import annotations

import _thread
import importlib
import sys
from collections.abc import Callable
from typing import Any


def _original(module: str, name: str) -> Any:
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched(module):
            return monkey.get_original(module, name)
    if "eventlet.patcher" in sys.modules:
        from eventlet import patcher

        if patcher.is_monkey_patched(module.lstrip("_")):
            return getattr(patcher.original(module), name)
    return getattr(importlib.import_module(module), name)


start_new_thread: Callable[[Callable[[], object], tuple[()]], int] = _original(
    "_thread", "start_new_thread")
allocate_lock: Callable[[], _thread.LockType] = _original("_thread", "allocate_lock")
RLock: Callable[[], _thread.RLock] = _original("_thread", "RLock")
get_ident: Callable[[], int] = _original("_thread", "get_ident")
sleep: Callable[[float], None] = _original("time", "sleep")
