"""The heartbeat thread of a worker.

A real OS thread (:mod:`threads`) that sleeps, then beats. Nobody ever waits for
it: stopping only sets a flag, and an exiting interpreter does not wait for it
either, so it can never delay a worker's exit. It changes no signal mask:
Python runs signal handlers in the main thread whatever thread the kernel
picked, and a process started from a callback inherits nothing from it.
"""

from __future__ import annotations

from collections.abc import Callable

from . import threads
from .events import Log


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, beat: Callable[[], None], log: Log,
                 sleep: Callable[[float], None] = threads.sleep) -> None:
        """``sleep``: waits up to its argument in seconds, less when there is news to act on
        at once (the worker was elected leader): the next beat comes then."""
        self._interval = interval
        self._beat = beat
        self._log = log
        self._sleep = sleep
        self._stopped = False

    def start(self) -> None:
        # The bare thread primitive: unlike threading.Thread.start it does not wait for the
        # thread to run, and no interpreter shutdown ever waits for it.
        threads.start_new_thread(self._run, ())

    def stop(self) -> None:
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _run(self) -> None:
        # Each beat sleeps (at most) a whole interval after the previous one ended.
        sleep, interval, beat = self._sleep, self._interval, self._beat
        while True:
            sleep(interval)
            if self._stopped:
                return
            try:
                beat()
            except Exception:
                self._log.exception("gunicorn_lifecycle: heartbeat failed")
