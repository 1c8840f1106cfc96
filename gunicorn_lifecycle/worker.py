"""The worker's side: register, beat, sweep, deregister."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .heartbeat import Heartbeat
from .layout import Slot
from .lock import LockTimeout
from .options import Options
from .process import own_start_time
from .tracker import Tracker, Transaction


class Worker:
    """One Gunicorn worker, registered in one slot of its master's generation."""

    def __init__(self, tracker: Tracker, generation: int, options: Options, server: Any,
                 worker: Any) -> None:
        self.tracker = tracker
        self.generation = generation
        self.options = options
        self.server = server
        self.worker = worker
        self.pid = os.getpid()
        self.started = own_start_time()
        self.index: int | None = None
        self.heartbeat = Heartbeat(options.interval, self.beat, tracker.log, tracker.deferred)

    def start(self) -> None:
        """post_fork: register, start beating, then tell ``worker_start``."""
        with self.tracker.transaction("worker_start", self.options.lock_timeout) as tx:
            found = tx.generation(self.generation)
            if found is None:
                self.tracker.log.error("gunicorn_lifecycle: worker %s belongs to generation %s, "
                                       "which is not open; it serves untracked", self.pid,
                                       self.generation)
                return
            if not self._register(tx):
                return
            self._emit(tx, "worker_start", "respawn" if found[1].gone else "spawn")
        self.heartbeat.start()

    def booted(self) -> None:
        """post_worker_init: the application is loaded."""
        with self.tracker.transaction("booted", self.options.lock_timeout) as tx:
            if self.index is not None:
                slot = tx.view.locked_slot(self.index)
                if self._is_mine(slot):
                    tx.view.write_slot(self.index, slot._replace(booted=1))

    def exit(self) -> None:
        """worker_exit: tell ``worker_exit`` (counting itself), then deregister."""
        self.heartbeat.stop()
        if self.index is None:
            return  # never tracked: no slot was free, or the lock could not be had
        with self.tracker.transaction("worker_exit", self.options.lock_timeout) as tx:
            if not self._owns(tx.view.locked_slot, self.index):
                self.tracker.log.info("gunicorn_lifecycle: worker %s exits after it was counted "
                                      "as lost", self.pid)
                return
            assert self.index is not None
            self._emit(tx, "worker_exit", "exit")  # counts itself: before it deregisters
            tx.deregister(self.index)
            self.index = None

    def beat(self) -> None:
        """One heartbeat: stamp the own slot, and sweep the node when a sweep is due.

        It never waits for the lock: if the lock is busy, the sweep or the return
        is left to a later beat, and the stamps go on meanwhile.
        """
        view = self.tracker.view
        try:
            if not self._stamp():
                self._register_again()
            since = time.monotonic_ns() - view.last_sweep()
            if not 0 <= since < self.options.interval * 1e9:  # < 0: a sweep of another boot
                self._sweep()
        except LockTimeout:
            pass

    def _stamp(self) -> bool:
        """Write the own slot's heartbeat, if the slot is still ours."""
        index = self.index
        return index is not None and self.tracker.view.stamp(index, self.pid, self.started,
                                                             time.monotonic_ns())

    def _sweep(self) -> None:
        """Drop every worker whose heartbeat overran; at most once per interval node-wide."""
        with self.tracker.transaction("sweep", 0) as tx:
            now = time.monotonic_ns()
            since = now - tx.view.last_sweep()
            if self.heartbeat.stopped or 0 <= since < self.options.interval * 1e9:
                return
            tx.view.set_last_sweep(now)
            for index in tx.view.sweep_candidates():
                slot = tx.view.locked_slot(index)
                if slot.seq % 2:  # left half-written by a writer that died
                    tx.view.write_slot(index, slot)
                if slot.registered and now - slot.heartbeat > slot.overrun:
                    tx.lose(index, "heartbeat", self.options, self.server, None)
            tx.then(self._stamp)  # the callbacks may be slow: be fresh when others sweep

    def _register_again(self) -> None:
        """A sweep took us for lost while we were only slow: come back, without callbacks."""
        with self.tracker.transaction("register", 0) as tx:
            if (self.heartbeat.stopped or self._owns(tx.view.locked_slot, self.index)
                    or tx.generation(self.generation) is None):
                return
            self.tracker.log.warning("gunicorn_lifecycle: worker %s was counted as lost (its "
                                     "heartbeat overran) but is alive; registered again",
                                     self.pid)
            self._register(tx)

    def _register(self, tx: Transaction) -> bool:
        self.index = tx.register(self.generation, self.pid, self.started, self.options.overrun)
        if self.index is None:
            self.tracker.log.error("gunicorn_lifecycle: state file %s has no free slot for "
                                   "worker %s (all %s taken); it serves untracked. Remove the "
                                   "file while no server runs and raise `slots`",
                                   tx.view.path, self.pid, tx.view.slots)
            return False
        if self.worker is not None and getattr(self.worker, "booted", False):
            tx.view.write_slot(self.index, tx.view.locked_slot(self.index)._replace(booted=1))
        return True

    def _owns(self, read: Callable[[int], Slot], index: int | None) -> bool:
        return index is not None and self._is_mine(read(index))

    def _is_mine(self, slot: Slot) -> bool:
        return slot.registered and slot.pid == self.pid and slot.started == self.started

    def _emit(self, tx: Transaction, callback: str, reason: str) -> None:
        tx.emit(callback, self.options, self.generation, self.pid, reason, worker_id=True,
                server=self.server, worker=self.worker)
