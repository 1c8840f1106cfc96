"""The heartbeat thread of a worker.

A bare thread that sleeps, then beats. Nobody ever waits for it: stopping only
sets a flag, and an exiting interpreter does not wait for it either, so it can
never delay a worker's exit. The thread primitive and ``time.sleep`` are taken
at import, before a gevent worker patches the standard library, so the thread
stays a real thread that the worker's event loop cannot starve.
"""

from __future__ import annotations

import _thread
import signal
import time
from collections.abc import Callable

from .events import Log

# Taken at import, before a gevent worker patches them: the beat stays a real thread.
_sleep = time.sleep
_start_thread = _thread.start_new_thread


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, beat: Callable[[], None], log: Log,
                 signals: frozenset[int]) -> None:
        self._interval = interval
        self._beat = beat
        self._log = log
        self._signals = signals
        self._stopped = False

    def start(self) -> None:
        # The bare thread primitive: unlike threading.Thread.start it does not wait for the
        # thread to run, and no interpreter shutdown ever waits for it.
        _start_thread(self._run, ())

    def stop(self) -> None:
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _run(self) -> None:
        # ``signals`` are for the worker's main thread: none is ever delivered here, so
        # that blocking them there while it holds the lock really holds them back.
        signal.pthread_sigmask(signal.SIG_BLOCK, self._signals)
        # Each beat sleeps a whole interval after the previous one ended: a stamp is never
        # older than interval plus one wake-up's latency, however slow a beat was.
        while True:
            _sleep(self._interval)
            if self._stopped:
                return
            try:
                self._beat()
            except Exception:
                self._log.exception("gunicorn_lifecycle: heartbeat failed")
