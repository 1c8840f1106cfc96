"""The master's side: generations open, supersede and close here.

Only a master opens generations, and it closes its own; it remembers the
options each of its open generations was opened with, because a ``HUP`` re-runs
``configure()`` and the old generation keeps its own callbacks until it closes.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from . import turn
from .errors import LifecycleError
from .layout import GenerationState, H, Readiness, Reason, SlotState
from .lifecycle import (
    MasterStarted,
    Owed,
    WorkerLost,
    close,
    close_dead,
    exit_reason,
    lose,
    owed_by,
    ready_if_complete,
    retire_if_unused,
)
from .liveness import Here, show_presence
from .options import Options
from .process import boot_id, own_start_time, pid_namespace
from .state import Generation, State
from .systemd import Moment
from .transaction import Transactions

# What systemd hears when this master exits: the unit stops; or a newer master serves on
# (systemd follows it, ready or not yet); or the master it replaced does (a rollback).
EXIT_MOMENTS = {Reason.STOP: Moment.STOPPING, Reason.UPGRADE: Moment.HANDED_OVER,
                Reason.ROLLBACK: Moment.ROLLED_BACK}


class Master:
    """A Gunicorn master and the generations it owns."""

    def __init__(self, transactions: Transactions, server: Any, parent_pid: int) -> None:
        self.tx = transactions
        self.log = transactions.log
        self.server = server
        self.pid = os.getpid()
        self.started = own_start_time()
        self.pidns = pid_namespace()
        self.parent_pid = parent_pid  # the USR2 parent (Gunicorn's GUNICORN_PID), else 0
        self.parent_started = 0
        self.depth = 0
        self.generations: dict[int, Options] = {}
        self.current = 0
        self._refused = 0  # reloads of the current burst that found no free generation record

    @property
    def options(self) -> Options:
        return self.generations[self.current]

    def start(self, options: Options) -> None:
        """Cold start, restart after a crash, or the new master of a USR2 upgrade.

        First what the state still owes is settled: generations whose master died
        close, and every exit not yet delivered is. Only then does the new
        generation open, so its master_start follows every master_exit it should,
        and can use the records those exits freed.
        """
        seen: list[bool] = []  # whether the first step found a crash
        self.tx.perform("master_start", lambda state: self._settle(state, options, seen),
                        options.lock_timeout)
        self.tx.perform("master_start", lambda state: self._begin(state, options, any(seen)),
                        options.lock_timeout)

    def reload(self, options: Options) -> None:
        """HUP: a new generation in this master; the old one closes with its last worker."""
        self.tx.perform("master_start", lambda state: self._reload(state, options),
                        options.lock_timeout)

    def reaped(self, pid: int, worker: Any) -> None:
        """A worker of ours is gone: if it never deregistered, it is lost."""
        self.tx.perform("reap", lambda state: self._reap(state, pid, worker),
                        self.options.lock_timeout)

    def follow_workers(self, target: int) -> None:
        """TTIN/TTOU (Gunicorn's num_workers changed): the current generation's target.

        Fewer workers may complete a generation's readiness, but not yet: Gunicorn
        stops the oldest workers next, booted or not. Their reap decides.
        """
        self.tx.perform("target", lambda state: self._follow(state, target),
                        self.options.lock_timeout)

    def exit(self) -> None:
        """on_exit: close every generation this master still has open."""
        self.tx.perform("master_exit", self._exit, self.options.lock_timeout)

    def _settle(self, state: State, options: Options, seen: list[bool]) -> list[Owed]:
        here = Here(state, self.tx.file.fd)
        if not here.same_boot:  # start times, clocks and turns of another boot mean nothing
            first, second = boot_id()
            state.set_header(H.BOOT_ID, first)
            state.set_header(H.BOOT_ID + 1, second)
            state.set_header(H.NEXT_SWEEP, 0)
            turn.reset(state)
        self._parents(state, here)  # refuses before anything changes
        owed: list[Owed] = []
        for gen in state.generations():
            if gen.serving and not here.master_alive(gen):
                owed += close_dead(state, gen, here, options, self.server)
            elif gen.state == GenerationState.CLOSED and gen.announced:
                owed += owed_by(state, gen, options, self.server)  # its closer never told
            else:
                retire_if_unused(state, gen.number)
        seen.append(bool(state.header(H.RESTART_DUE)))
        return owed

    def _begin(self, state: State, options: Options, crashed: bool) -> list[Owed]:
        parents = self._parents(state, Here(state, self.tx.file.fd))
        if parents:
            parent = max(parents, key=lambda g: g.lineage)
            self.parent_started, self.depth = parent.master_started, parent.depth + 1
            reason = Reason.UPGRADE
        else:
            self.parent_pid = 0
            self.depth = max((g.depth + 1 for g in state.generations()), default=0)
            reason = Reason.RESTART if crashed or state.header(H.RESTART_DUE) else Reason.START
        state.set_header(H.RESTART_DUE, 0)
        return self._open(state, reason, options)

    def _parents(self, state: State, here: Here) -> list[Generation]:
        """The live USR2 parent's generations; LifecycleError for any other live master's."""
        parents = []
        for gen in state.generations():
            if gen.serving and here.master_alive(gen):
                if gen.master_pid != self.parent_pid:
                    raise LifecycleError(
                        f"state file {state.path} is in use by the live Gunicorn master "
                        f"{gen.master_pid} (generation {gen.number}), which is not this "
                        "master's USR2 parent; give each instance its own state_file")
                parents.append(gen)
        return parents

    def _reload(self, state: State, options: Options) -> list[Owed]:
        current = state.generation(self.current)
        if state.free_generation_index() is None:
            self._refused += 1
            if self._refused == 1:
                self.log.error(
                    "gunicorn_lifecycle: HUP: every generation record of %s is held by a "
                    "generation whose workers have not all exited yet; generation %s goes on "
                    "with its options until one drains. Send HUP less often than workers drain "
                    "(graceful_timeout), or stop the workers that never exit",
                    state.path, self.current)
            return []
        if self._refused:
            self.log.warning("gunicorn_lifecycle: %s reloads found no free generation record "
                             "and were folded into generation %s", self._refused, self.current)
            self._refused = 0
        owed = self._open(state, Reason.RELOAD, options)
        opened = state.generation(self.current)
        if opened is not None:
            state.mark(Moment.RELOADING, opened)
        if current is not None and current.state == GenerationState.OPEN:
            state.set_generation(current.index, state=GenerationState.SUPERSEDED)
        return owed + self._close_drained(state)

    def _reap(self, state: State, pid: int, worker: Any) -> list[Owed]:
        owed: list[Owed] = []
        ours = [s for s in state.slots_in(SlotState.REGISTERED, SlotState.LOST)
                if s.pid == pid and s.generation in self.generations]
        ours.sort(key=lambda s: s.state != SlotState.REGISTERED)  # a stale lost one, last
        for slot in ours[:1]:
            if slot.state == SlotState.REGISTERED:
                # Gunicorn marks a worker it aborted for overrunning its timeout.
                reason = Reason.TIMEOUT if getattr(worker, "aborted", False) else Reason.CRASH
                owed += lose(state, slot, reason, True, self.generations[slot.generation],
                             self.server, worker)
            else:  # lost earlier (by heartbeat, or cut short in its exit), and now dead
                owed.append(WorkerLost(slot.index, slot.pid, slot.started, True,
                                       self.generations[slot.generation], self.server, worker))
        # after a TTOU, the workers left may be enough
        ready = ready_if_complete(state, self.current, self.options, self.server)
        return owed + ready + self._close_drained(state)

    def _follow(self, state: State, target: int) -> list[Owed]:
        gen = state.generation(self.current)
        if gen is not None and gen.state == GenerationState.OPEN:
            state.set_generation(gen.index, target=target)
        return []

    def _exit(self, state: State) -> list[Owed]:
        here = Here(state, self.tx.file.fd)
        owed: list[Owed] = []
        for number in sorted(self.generations):
            options = self.generations[number]
            for slot in state.slots_in(SlotState.REGISTERED):
                # Gunicorn gave up on it (killed at the end of graceful_timeout, never reaped).
                if slot.generation == number:
                    owed += lose(state, slot, Reason.CRASH, False, options, self.server)
            gen = state.generation(number)
            if gen is not None and gen.serving:
                reason = exit_reason(state, gen, here, master_alive=True)
                owed += self._close(state, gen, reason)
                if reason in EXIT_MOMENTS:
                    state.mark(EXIT_MOMENTS[reason], gen)
        self.generations.clear()
        return owed

    def _open(self, state: State, reason: Reason, options: Options) -> list[Owed]:
        index = state.free_generation_index()
        if index is None:
            raise LifecycleError(f"state file {state.path}: every generation record is in use; "
                                 "stop the masters that still use it, or remove the file "
                                 "when none runs")
        number = state.take_generation_number()
        state.open_generation(
            index, number=number, opened=reason, closed=Reason.NONE, announced=0,
            master_pid=self.pid, master_started=self.started, pidns=self.pidns,
            parent_pid=self.parent_pid, parent_started=self.parent_started, depth=self.depth,
            gone=0, opened_at=time.time_ns(), overrun=int(options.overrun * 1e9), closed_at=0,
            target=self.server.num_workers, ready=Readiness.NOT_YET, ready_at=0)
        state.tally(H.OPENED_TALLY, reason)
        show_presence(self.tx.file.fd, index, True)
        self.generations[number] = options
        self.current = number
        return [MasterStarted(number, reason, options, self.server)]

    def _close_drained(self, state: State) -> list[Owed]:
        """Close the generations a HUP superseded once their last worker is gone."""
        registered = Counter(s.generation for s in state.slots_in(SlotState.REGISTERED))
        owed: list[Owed] = []
        for number in sorted(self.generations):
            gen = state.generation(number)
            if gen is not None and gen.state == GenerationState.SUPERSEDED and not registered[
                    number]:
                owed += self._close(state, gen, Reason.RELOAD)
        return owed

    def _close(self, state: State, gen: Generation, reason: Reason) -> list[Owed]:
        owed = close(state, gen, reason, self.generations.pop(gen.number), self.server)
        show_presence(self.tx.file.fd, gen.index, False)
        return owed
