"""The inter-process lock: a flock on a file beside the state file.

A flock belongs to an open file description, which a fork shares with the
child; so each process opens the lock file itself (a worker in ``post_fork``,
before Gunicorn drops its privileges), and the threads of one process exclude
each other with a thread lock. filelock's descriptor lock takes the flock; the
wait polls with a backoff that starts at 0.1 ms, so a short wait is not
quantised and a long one costs little CPU.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import filelock

from .errors import LifecycleError

_FIRST_POLL = 0.0001
_LAST_POLL = 0.005


class LockTimeout(Exception):
    """The lock was not obtained in time; the message says who gave up on what."""


class Lock:
    """One lock per state file, usable from any process and thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = 0
        self._fd = -1
        self._threads = threading.Lock()

    def open(self, owner: tuple[int, int] | None = None) -> None:
        """Open this process's own descriptor; ``owner`` (uid, gid) gets a new lock file."""
        if self._pid == os.getpid():
            return
        if self._fd >= 0:
            os.close(self._fd)  # the parent's open file description: sharing it shares its lock
        self._fd = _open_lock_file(self.path, owner)
        self._pid = os.getpid()
        self._threads = threading.Lock()  # another thread of the parent may have held the old one

    @contextmanager
    def hold(self, timeout: float, event: str,
             holder: Callable[[], str] = lambda: "another process") -> Iterator[None]:
        """Hold the lock for ``event``; LockTimeout after ``timeout`` seconds (0: one try)."""
        self.open()
        deadline = time.monotonic() + timeout
        if not self._threads.acquire(timeout=timeout):
            raise self._timeout(timeout, event, holder)
        try:
            delay = _FIRST_POLL
            while not filelock.lock_descriptor(self._fd, blocking=False):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(timeout, event, holder)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _LAST_POLL)
            try:
                yield
            finally:
                filelock.unlock_descriptor(self._fd)
        finally:
            self._threads.release()

    def _timeout(self, timeout: float, event: str, holder: Callable[[], str]) -> LockTimeout:
        return LockTimeout(f"gave up on {event} in pid {os.getpid()} after {timeout:.1f}s: the "
                           f"lock {self.path} is held by {holder()}")


def _open_lock_file(path: str, owner: tuple[int, int] | None) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchmod(fd, 0o600)
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *owner)
    except OSError as exc:
        raise LifecycleError(f"lock file {path} cannot be opened ({exc.strerror}); remove it if "
                             "it is a link or not a regular file, fix its permissions, or "
                             "choose another state_file") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise LifecycleError(f"lock file {path} is not a regular file; remove it or choose "
                             "another state_file")
    if owner is not None and info.st_uid not in (os.geteuid(), owner[0]):
        os.close(fd)
        raise LifecycleError(f"lock file {path} is owned by uid {info.st_uid}, not by this "
                             "server; remove it if it is stale, or choose another state_file")
    return fd
