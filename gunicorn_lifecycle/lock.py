"""The inter-process lock: a filelock on a file beside the state file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import filelock

from .errors import LifecycleError

# filelock polls a non-blocking flock; its default of 50 ms would quantise every
# contended wait (eight workers exiting together would queue in 50 ms steps).
POLL_INTERVAL = 0.0005


class LockTimeout(Exception):
    """The lock was not obtained within ``lock_timeout``."""


class Lock:
    """One lock per state file, safe to use in any process and thread.

    The filelock object is made per process (never inherited across a fork)
    and is thread-local, so a worker's heartbeat thread and its main thread
    exclude each other like any two processes do.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = 0
        self._lock: filelock.FileLock | None = None

    def _filelock(self) -> filelock.FileLock:
        if self._lock is None or self._pid != os.getpid():
            self._lock = filelock.FileLock(self.path, mode=0o600)
            self._pid = os.getpid()
        return self._lock

    @contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        """Hold the lock; LockTimeout after ``timeout`` seconds, LifecycleError if unusable."""
        lock = self._filelock()
        try:
            lock.acquire(timeout=timeout, poll_interval=POLL_INTERVAL)
        except filelock.Timeout:
            raise LockTimeout(self.path) from None
        except OSError as exc:
            raise LifecycleError(f"lock file {self.path} cannot be used ({exc}); fix its "
                                 "permissions, remove it if it is not a regular file, "
                                 "or choose another state_file") from None
        try:
            yield
        finally:
            lock.release()

    def hand_to(self, owner: tuple[int, int]) -> None:
        """Give the lock file to Gunicorn's worker user, who must open it after the drop."""
        info = os.stat(self.path, follow_symlinks=False)
        if (info.st_uid, info.st_gid) != owner:
            os.chown(self.path, *owner, follow_symlinks=False)
