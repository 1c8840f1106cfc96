"""The state lock: mutual exclusion over the state file, node-wide.

**The state lock** is a ``flock`` on the state file itself, taken through this
process's own descriptor. Tying it to the state file (not to a lock file beside
it) keeps mutual exclusion whatever happens to other files in its directory. A
flock belongs to an open file description, which a fork shares with the child,
so each process locks through a description of its own (a worker reopens the
master's descriptor in ``post_fork``, see :mod:`statefile`: the same file,
never another one at the same path). filelock's descriptor lock takes the
flock; a wait polls with a backoff from 0.1 ms to 1 ms. The threads of one
process exclude each other with a real reentrant lock, which also lets a thread
that an exception (a worker's quick exit, raised by a signal handler) left
holding it take it again on its way out, instead of waiting for itself.

A process that waited out ``lock_timeout`` once only tries the lock, without
waiting, until it has it again: a lock held forever (a process frozen while it
held it) costs each process one timeout, not one per hook call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import filelock

from . import threads

_FIRST_POLL = 0.0001
_LAST_POLL = 0.001  # a waiter for a lock held microseconds learns of its release soon


class LockTimeout(Exception):
    """The lock was not had in time; the message says who gave up on what, and who holds it.

    The holder is named when the message is first read (a log line, at once),
    not when it is raised: a sweep that finds the lock busy, one try a beat,
    drops it unread and pays nothing for a name.
    """

    def __init__(self, gave_up: str, holder: Callable[[], str]) -> None:
        super().__init__(gave_up)
        self._holder: Callable[[], str] | None = holder
        self._message = gave_up

    def __str__(self) -> str:
        holder = self._holder  # read once: two threads reading the message both get it whole
        if holder is not None:
            self._message = f"{self.args[0]}{holder()}"
            self._holder = None
        return self._message


class Locked(Protocol):
    """The file to lock: its path, and this process's own descriptor of it."""

    path: str
    fd: int


class StateLock:
    """Mutual exclusion over the state file, for every process and thread that uses it."""

    def __init__(self, file: Locked) -> None:
        self.file = file
        self._threads = threads.RLock()
        self._stalled = False

    def after_fork(self) -> None:
        """In a forked child (which reopened the file): forget the parent's threads."""
        self._threads = threads.RLock()  # another thread of the parent may have held it
        self._stalled = False

    @contextmanager
    def hold(self, timeout: float, what: str, holder: Callable[[], str]) -> Iterator[None]:
        """Hold the lock for ``what``; LockTimeout after ``timeout`` seconds (0: one try)."""
        if self._stalled:
            timeout = 0
        deadline = time.monotonic() + timeout
        acquired = (self._threads.acquire(True, timeout) if timeout > 0
                    else self._threads.acquire(False))
        if not acquired:
            raise self._timeout(timeout, what, lambda: "another thread of this process")
        try:
            delay = _FIRST_POLL
            while not filelock.lock_descriptor(self.file.fd, blocking=False):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(timeout, what, holder)
                threads.sleep(min(delay, remaining))
                delay = min(delay * 2, _LAST_POLL)
            self._stalled = False
            try:
                yield
            finally:
                filelock.unlock_descriptor(self.file.fd)
        finally:
            self._threads.release()

    def _timeout(self, timeout: float, what: str, holder: Callable[[], str]) -> LockTimeout:
        self._stalled = timeout > 0
        return LockTimeout(f"gave up on {what} in pid {os.getpid()} after {timeout:.1f}s: the "
                           f"state lock on {self.file.path} is held by ", holder)
