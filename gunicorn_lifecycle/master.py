"""The master's side: generations open, supersede and close here.

Only a master opens and closes generations; it remembers the options each of
its open generations was opened with, because a ``HUP`` re-runs ``configure()``
and the old generation keeps its own callbacks until it closes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .errors import LifecycleError
from .layout import MASTER_REASONS, Generation, GenerationState
from .options import Options
from .process import boot_id, is_alive, own_start_time
from .tracker import Tracker, Transaction


class Master:
    """A Gunicorn master and the generations it owns."""

    def __init__(self, tracker: Tracker, server: Any, parent_pid: int) -> None:
        self.tracker = tracker
        self.server = server
        self.pid = os.getpid()
        self.started = own_start_time()
        self.parent_pid = parent_pid  # the USR2 parent (Gunicorn's GUNICORN_PID), else 0
        self.generations: dict[int, Options] = {}
        self.current = 0

    @property
    def options(self) -> Options:
        return self.generations[self.current]

    def start(self, options: Options) -> None:
        """Cold start, restart after a crash, or the new master of a USR2 upgrade."""
        log = self.tracker.log
        with self.tracker.transaction("master_start", options.lock_timeout) as tx:
            tx.repair()
            rebooted = tx.view.boot_id() != boot_id()
            if rebooted:  # start times and monotonic stamps of another boot mean nothing
                tx.view.set_boot_id(boot_id())
                tx.view.set_last_sweep(0)
            dead, parents = [], []
            for index, record in tx.open_generations():
                if rebooted or not is_alive(record.master_pid, record.master_started):
                    dead.append(index)
                elif record.master_pid == self.parent_pid:
                    parents.append(index)
                else:
                    raise LifecycleError(
                        f"state file {tx.view.path} is in use by the live Gunicorn master "
                        f"{record.master_pid} (generation {record.generation}), which is not "
                        "this master's USR2 parent; give each instance its own state_file")
            for index in dead:
                record = tx.view.locked_generation(index)
                log.warning("gunicorn_lifecycle: closing generation %s of master %s, which died "
                            "without on_exit", record.generation, record.master_pid)
                tx.close(index, log)
            reason = "upgrade" if parents else "restart" if dead else "start"
            self._open(tx, reason, options)

    def reload(self, options: Options) -> None:
        """HUP: a new generation in this master; the old one closes with its last worker."""
        with self.tracker.transaction("master_start", options.lock_timeout) as tx:
            found = tx.generation(self.current)
            self._open(tx, "reload", options)
            if found is not None:
                index, record = found
                tx.view.write_generation(index, record._replace(state=GenerationState.SUPERSEDED))
            self._close_drained(tx)

    def reaped(self, pid: int, worker: Any) -> None:
        """A worker of ours is gone: if it never deregistered, it is lost ("crash")."""
        with self.tracker.transaction("worker_lost", self.options.lock_timeout) as tx:
            for index, slot in tx.view.locked_slots():
                if slot.registered and slot.pid == pid and slot.generation in self.generations:
                    tx.lose(index, "crash", self.generations[slot.generation], self.server, worker)
                    break
            self._close_drained(tx)

    def exit(self) -> None:
        """on_exit: close every generation this master still has open."""
        with self.tracker.transaction("master_exit", self.options.lock_timeout) as tx:
            for number in sorted(self.generations):
                found = tx.generation(number)
                if found is not None:
                    self._close(tx, *found, self._exit_reason(tx, found[1]))
            self.generations.clear()

    def _open(self, tx: Transaction, reason: str, options: Options) -> None:
        free = [i for i, record in tx.view.locked_generations() if not record.is_open]
        if not free:
            raise LifecycleError(f"state file {tx.view.path}: every generation record is open; "
                                 "stop the masters that still use it, or remove the file "
                                 "when none runs")
        number = tx.view.next_generation()
        tx.view.set_next_generation(number + 1)
        tx.view.write_generation(free[0], Generation(
            0, GenerationState.OPEN, MASTER_REASONS.index(reason), number, self.pid,
            self.parent_pid, self.started, 0, time.time()))
        self.generations[number] = options
        self.current = number
        tx.emit("master_start", options, number, self.pid, reason, worker_id=False,
                server=self.server, worker=None)

    def _close_drained(self, tx: Transaction) -> None:
        """Close the generations a HUP superseded once their last worker is gone."""
        for number in sorted(self.generations):
            found = tx.generation(number)
            if found is None or found[1].state != GenerationState.SUPERSEDED:
                continue
            if tx.counts(number)[1] == 0:
                self._close(tx, *found, "reload")

    def _close(self, tx: Transaction, index: int, record: Generation, reason: str) -> None:
        number = record.generation
        options = self.generations.pop(number)
        for slot_index, slot in tx.view.locked_slots():
            # Gunicorn never reaped it (say, killed at the end of graceful_timeout): lost.
            if slot.registered and slot.generation == number:
                tx.lose(slot_index, "crash", options, self.server, None)
        tx.close(index, self.tracker.log)
        tx.emit("master_exit", options, number, self.pid, reason, worker_id=False,
                server=self.server, worker=None)

    def _exit_reason(self, tx: Transaction, record: Generation) -> str:
        if record.state == GenerationState.SUPERSEDED:
            return "reload"
        others = [g for _, g in tx.open_generations() if g.master_pid != self.pid
                  and is_alive(g.master_pid, g.master_started)]
        if any(g.generation > record.generation for g in others):
            return "upgrade"
        if self.parent_pid and any(g.master_pid == self.parent_pid for g in others):
            return "rollback"
        return "stop"
