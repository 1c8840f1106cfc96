"""The bookkeeping every process shares: transactions, counts, slots.

A transaction holds the lock, lets the caller change the state, then runs the
callbacks it queued, still under the lock: every change is complete before any
user code runs, so a callback that raises cannot leave the state half-done.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .events import Event, Log, run_callback
from .layout import (
    FREE_SLOT,
    Generation,
    GenerationState,
    Slot,
    SlotState,
    StateView,
)
from .lock import Lock
from .options import Options
from .statefile import StateFile

LOCK_EVENTS = ("", "master_start", "master_exit", "worker_start", "worker_exit",
               "worker_lost", "sweep", "booted", "register")


class CallbackFailed(Exception):
    """A user callback raised under ``on_error="raise"``; carries the original error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class Transaction:
    """The state, open for changes, and the callbacks to run once they are made."""

    def __init__(self, view: StateView) -> None:
        self.view = view
        self._calls: list[tuple[str, Event, Options]] = []
        self._then: list[Callable[[], object]] = []

    def emit(self, callback: str, options: Options, number: int, pid: int, reason: str, *,
             worker_id: bool, server: Any, worker: Any) -> None:
        """Queue the user's ``callback``, if set, with the event as it is now (counts included)."""
        if getattr(options, callback) is None:
            return
        n_prev, n_mine, n_next = self.counts(number)
        event_id = f"{number}-{pid}" if worker_id else str(number)
        event = Event(event_id, n_prev, n_mine, n_next, reason, number, pid, server, worker)
        self._calls.append((callback, event, options))

    def then(self, step: Callable[[], object]) -> None:
        """Run ``step`` after the callbacks, before the lock is released."""
        self._then.append(step)

    def run_callbacks(self, log: Log) -> None:
        failure: BaseException | None = None
        for name, event, options in self._calls:
            try:
                run_callback(name, event, options, log)
            except Exception as exc:
                failure = failure or exc
        for step in self._then:
            step()
        if failure is not None:
            raise CallbackFailed(failure)

    # reading

    def generation(self, number: int) -> tuple[int, Generation] | None:
        for index, record in self.view.locked_generations():
            if record.is_open and record.generation == number:
                return index, record
        return None

    def open_generations(self) -> list[tuple[int, Generation]]:
        found = [(i, g) for i, g in self.view.locked_generations() if g.is_open]
        return sorted(found, key=lambda item: item[1].generation)

    def counts(self, number: int) -> tuple[int | None, int, int | None]:
        """Live workers of the nearest open generation below, of ``number``, and above."""
        per_generation: dict[int, int] = {g.generation: 0 for _, g in self.open_generations()}
        for state, generation in self.view.slot_uses():
            if state == SlotState.REGISTERED and generation in per_generation:
                per_generation[generation] += 1
        older = [g for g in per_generation if g < number]
        newer = [g for g in per_generation if g > number]
        return (
            per_generation[max(older)] if older else None,
            per_generation.get(number, 0),
            per_generation[min(newer)] if newer else None,
        )

    # changing

    def register(self, number: int, pid: int, started: int, overrun: float) -> int | None:
        """Put a worker in a free slot; None when every slot is taken."""
        for index, (state, _) in enumerate(self.view.slot_uses()):
            if state != SlotState.REGISTERED:
                self.view.write_slot(index, Slot(0, SlotState.REGISTERED, 0, number, pid,
                                                 started, time.monotonic_ns(),
                                                 int(overrun * 1e9)))
                return index
        return None

    def deregister(self, index: int) -> None:
        """Free a slot and count its worker as gone from its generation (for "respawn")."""
        slot = self.view.locked_slot(index)
        self.view.write_slot(index, FREE_SLOT)
        found = self.generation(slot.generation)
        if found is not None:
            gen_index, record = found
            self.view.write_generation(gen_index, record._replace(gone=record.gone + 1))

    def lose(self, index: int, reason: str, options: Options, server: Any, worker: Any) -> None:
        """A worker died without a word: drop it, then tell ``worker_lost``."""
        slot = self.view.locked_slot(index)
        self.deregister(index)
        self.emit("worker_lost", options, slot.generation, slot.pid, reason, worker_id=True,
                  server=server, worker=worker)

    def repair(self) -> None:
        """Finish the records a writer left half-written (it died, or a signal cut it short)."""
        for index, record in self.view.locked_generations():
            if record.seq % 2:
                self.view.write_generation(index, record)
        for index, slot in self.view.locked_slots():
            if slot.seq % 2:
                self.view.write_slot(index, slot)

    def close(self, index: int, log: Log) -> None:
        """Close a generation, dropping whatever slots it still holds (their master died)."""
        record = self.view.locked_generation(index)
        for slot_index, slot in self.view.locked_slots():
            if slot.registered and slot.generation == record.generation:
                log.warning("gunicorn_lifecycle: dropping worker %s of closed generation %s",
                            slot.pid, record.generation)
                self.view.write_slot(slot_index, FREE_SLOT)
        self.view.write_generation(index, record._replace(state=GenerationState.FREE))


class Tracker:
    """One state file and its lock, as seen from this process.

    ``deferred`` are the signals whose handlers could re-enter a transaction
    (old Gunicorn masters reap workers, and call ``child_exit``, from the SIGCHLD
    handler) or end it halfway (a worker's SIGQUIT handler exits): they are
    blocked while a transaction runs and delivered when it is over.
    """

    def __init__(self, state: StateFile, lock: Lock, log: Log,
                 deferred: frozenset[int] = frozenset()) -> None:
        self.state = state
        self.lock = lock
        self.log = log
        self.deferred = deferred

    @property
    def view(self) -> StateView:
        return self.state.view

    @contextmanager
    def transaction(self, event: str, timeout: float) -> Iterator[Transaction]:
        """Hold the lock for ``event``; LockTimeout names the holder if it is not had in time."""
        with blocked(self.deferred), self.lock.hold(timeout, event, self._holder):
            self.view.set_holder(os.getpid(), LOCK_EVENTS.index(event))
            transaction = Transaction(self.view)
            yield transaction
            transaction.run_callbacks(self.log)

    def _holder(self) -> str:
        pid, code = self.view.holder()
        return f"pid {pid} ({LOCK_EVENTS[code] if code < len(LOCK_EVENTS) else '?'})"


@contextmanager
def blocked(signals: frozenset[int]) -> Iterator[None]:
    """Hold back ``signals`` in this thread; the pending ones arrive on the way out."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
