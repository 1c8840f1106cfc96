"""The state lock: mutual exclusion over the state file, node-wide.

**The state lock** is a ``flock`` on the state file itself, taken through this
process's own descriptor. Tying it to the state file (not to a lock file beside
it) keeps mutual exclusion whatever happens to other files in its directory. A
flock belongs to an open file description, which a fork shares with the child,
so each process locks through a description of its own (a forked child gets
one at the fork, see :mod:`statefile`: the same file, never another one at the
same path). filelock's descriptor lock takes the flock without waiting; a
waiter reads the header's RELEASES word, tries, says it waits (LOCK_WAITERS),
tries again, and sleeps on RELEASES (:mod:`futex`) while it is unchanged; every
holder, once it released the flock, stores a new value there and, when someone
said it waits, wakes the waiters: a waiter learns of a release at once, and no
poll's sleep outlasts it, while a release nobody waits for costs no system
call. (A waiter that says it waits just after a release looked is what its
second try is for; the rare one that still sleeps through a release learns of
it at its next look, within :data:`LOOK`. A holder
killed in its section releases the flock without a word: its waiters find out
at their next look, within :data:`LOOK`.) The threads of one process exclude
each other with a real reentrant lock, which also lets a thread that an
exception (a worker's quick exit, raised by a signal handler) left holding it
take it again on its way out, instead of waiting for itself.

A process that waited out ``lock_timeout`` once only tries the lock, without
waiting, until it has it again: a lock held forever (a process frozen while it
held it) costs each process one timeout, not one per hook call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import filelock

from . import threads
from .futex import Futex
from .layout import H

LOOK = 0.005  # how long a waiter sleeps at most before it tries the lock again


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
    """The file to lock: its path, this process's own descriptor of it, and its mapping."""

    path: str
    fd: int
    mapping: Any
    words: Any

    def verify(self) -> None: ...
    def intact(self) -> bool: ...


class StateLock:
    """Mutual exclusion over the state file, for every process and thread that uses it."""

    def __init__(self, file: Locked) -> None:
        self.file = file
        self._threads = threads.RLock()
        self._stalled = False
        self._releases: Futex | None = None

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
            view, fd = self.file.words.view, self.file.fd
            while True:
                if not self.file.intact():  # before the mapping is touched
                    self.file.verify()  # StateDamaged, saying what changed
                seen = view[H.RELEASES]  # read before the try: a release after it changes it
                if filelock.lock_descriptor(fd, blocking=False):
                    break
                now = time.monotonic()
                if now >= deadline:
                    raise self._timeout(timeout, what, holder)
                view[H.LOCK_WAITERS] = 1
                if filelock.lock_descriptor(fd, blocking=False):
                    break
                self._sleeper().wait(seen, 0, min(deadline, now + LOOK))
            self._stalled = False
            try:
                yield
            finally:
                filelock.unlock_descriptor(fd)
                # Then a value no waiter has read yet: one that read the word before its try
                # failed sleeps only while the word is unchanged.
                if self.file.intact():
                    view[H.RELEASES] = time.monotonic_ns()
                    if view[H.LOCK_WAITERS]:
                        view[H.LOCK_WAITERS] = 0
                        self._sleeper().wake(0)
        finally:
            self._threads.release()

    def _sleeper(self) -> Futex:
        if self._releases is None:
            self._releases = Futex(self.file.mapping, H.RELEASES)
        return self._releases

    def _timeout(self, timeout: float, what: str, holder: Callable[[], str]) -> LockTimeout:
        self._stalled = timeout > 0
        return LockTimeout(f"gave up on {what} in pid {os.getpid()} after {timeout:.1f}s: the "
                           f"state lock on {self.file.path} is held by ", holder)
