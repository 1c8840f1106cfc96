"""The heartbeat baseline: a tracker built the way Kong's lua-resty-worker-manager works.

All workers share one JSON document under one file lock. Every heartbeat of
every worker takes the lock, reads the whole document, stamps its own entry,
sweeps every other worker's entry for an overrun and writes the document back:
the cost of a beat grows with the number of workers, and beats queue on the
lock. gunicorn_lifecycle is measured against this.

Wired through Gunicorn's hooks by the lines :func:`hooks` returns.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import filelock

# filelock polls a non-blocking flock; its default 50 ms would make the baseline
# look slow for waiting rather than for working, so poll as finely as the plugin.
POLL_INTERVAL = 0.0005

HOOKS = '''\
from benchmarks import naive

naive.configure({path!r}, interval={interval!r}, failed={failed!r})

on_starting = naive.on_starting
post_fork = naive.post_fork
worker_exit = naive.worker_exit
'''


def hooks(path: Path, interval: float, failed: float) -> str:
    """Config lines that wire the naive tracker into Gunicorn."""
    return HOOKS.format(path=str(path), interval=interval, failed=failed)


class NaiveTracker:
    """One JSON document of ``{pid: last heartbeat}``, rewritten whole under one lock."""

    def __init__(self, path: str, interval: float, failed: float) -> None:
        self.path = path
        self.interval = interval
        self.overrun = interval + failed
        self.lost = 0
        self._stopped = threading.Event()
        self._lock: filelock.FileLock | None = None
        self._lock_pid = 0

    def _locked(self) -> filelock.FileLock:
        """A lock object of this process's own: filelock refuses one inherited across fork."""
        if self._lock is None or self._lock_pid != os.getpid():
            self._lock = filelock.FileLock(self.path + ".lock")
            self._lock_pid = os.getpid()
        return self._lock

    def reset(self) -> None:
        with self._locked().acquire(poll_interval=POLL_INTERVAL):
            self._write({"workers": {}})

    def beat(self) -> None:
        """Stamp our entry and sweep every other one, all in one read-modify-write."""
        me = str(os.getpid())
        with self._locked().acquire(poll_interval=POLL_INTERVAL):
            document = self._read()
            workers: dict[str, float] = document["workers"]
            now = time.monotonic()
            workers[me] = now
            for pid, stamp in list(workers.items()):
                if pid != me and now - stamp > self.overrun:
                    del workers[pid]
                    self.lost += 1
            self._write(document)

    def leave(self) -> None:
        self._stopped.set()
        with self._locked().acquire(poll_interval=POLL_INTERVAL):
            document = self._read()
            document["workers"].pop(str(os.getpid()), None)
            self._write(document)

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._run, name="naive-heartbeat", daemon=True).start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def _read(self) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            document: dict[str, Any] = json.loads(f.read())
        return document

    def _write(self, document: dict[str, Any]) -> None:
        with open(self.path, "wb") as f:
            f.write(json.dumps(document).encode())


_tracker: NaiveTracker | None = None


def configure(path: str, interval: float, failed: float) -> None:
    global _tracker
    _tracker = NaiveTracker(path, interval, failed)


def _configured() -> NaiveTracker:
    if _tracker is None:
        raise RuntimeError("benchmarks.naive.configure() was not called in the config")
    return _tracker


def on_starting(server: Any) -> None:
    _configured().reset()


def post_fork(server: Any, worker: Any) -> None:
    tracker = _configured()
    tracker.beat()  # register
    tracker.start_heartbeat()


def worker_exit(server: Any, worker: Any) -> None:
    if worker.pid == os.getpid():
        _configured().leave()
