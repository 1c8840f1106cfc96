"""The worker's side: register, beat, sweep, come back, exit."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from . import threads
from .errors import LifecycleError, StateDamaged
from .events import CallbackFailed
from .heartbeat import Heartbeat
from .layout import Flag, H, Reason, S, SlotState, slot_at
from .leader import Leadership, withdraw
from .lifecycle import (
    Owed,
    WorkerExited,
    WorkerStarted,
    close_dead,
    count_gone,
    free_slot,
    lose,
    ready_if_complete,
    retire_if_unused,
    sweep,
)
from .liveness import Here
from .lock import LockTimeout
from .options import Options
from .process import own_start_time
from .state import Slot, State
from .transaction import Courier, Transactions

NEWS = 0.5  # at a shorter interval a beat learns of an election soon enough by itself
# The beat's names, bound once: it runs every interval in every worker.
_LEADER, _NEXT_SWEEP, _SEEK_END = int(H.LEADER), int(H.NEXT_SWEEP), os.SEEK_END
_clock, _lseek = time.monotonic_ns, os.lseek


class Worker:
    """One Gunicorn worker, registered in one slot of its master's generation."""

    def __init__(self, transactions: Transactions, generation: int, options: Options,
                 server: Any, worker: Any, serving: Callable[[], bool] = lambda: True) -> None:
        """``serving``: False once the worker is on its way out (it then declines to lead)."""
        self.tx = transactions
        self.log = transactions.log
        self.generation = generation
        self.options = options
        self.server = server
        self.worker = worker
        self.pid = os.getpid()
        self.started = own_start_time()
        self.index: int | None = None
        self.token = 0
        self.aborted = False  # Gunicorn's worker_abort ran: its exit is a loss ("timeout")
        self.heartbeat = Heartbeat(options.interval, self.beat, self.log, self._until_news)
        self.courier = Courier(transactions, self.log)
        self._serving = serving
        self._withdrawn = False  # it found it no longer serves, and withdrew from leadership
        self.leadership = Leadership(transactions, generation, options, server, worker,
                                     lambda: not self._leaving and serving())
        self._view = transactions.state.words.view
        self._fd, self._size = transactions.file.fd, transactions.file.size
        self._owner_at = self._heartbeat_at = 0
        self._interval = int(options.interval * 1e9)
        self._late = int((options.overrun + options.interval) * 1e9)
        self._last = 0
        self._untracked = False
        self._leaving = False
        self._start_owed = False  # registered, its worker_start not yet delivered (nor given up)
        self._was_counted = False  # its start or resume took effect (under the lock)
        self._slept_on = 0  # the leader word the heartbeat last slept on

    def start(self) -> None:
        """post_fork: register and start beating; no callback runs here.

        Until Gunicorn's worker installs its signal handlers (after ``post_fork``)
        it has its master's, and a TERM is lost: nothing here waits for a turn.
        """
        self.tx.run("register", self._register, self.options.lock_timeout)
        if self.index is not None:
            self.heartbeat.start()

    def booted(self) -> None:
        """post_worker_init: deliver ``worker_start``, then mark the slot booted (only the
        flags word is written).

        The application is loaded and Gunicorn's signal handlers are in place: a
        worker stopped while it waits for its turn stops waiting, and neither
        starts nor boots. The boot that brings its generation's booted workers to
        the target makes the generation ready, and runs ``master_ready`` here. A
        worker taken for lost meanwhile is marked too: it counts as booted when it
        comes back.
        """
        if self.index is not None:
            try:
                self.tx.run("booted", self._start, self.options.lock_timeout, then=self._boot,
                            cancel=lambda: not self._serving())
            finally:
                self._start_owed = False

    def exit(self) -> None:
        """worker_exit: deliver ``worker_exit`` (counting itself), then free the slot.

        It beats on until the slot is freed: waiting its turn, it is alive. Cut
        short (a quick shutdown's SystemExit while it waits, a lock it cannot
        have), it leaves its slot as it is, for its master to report lost.
        """
        self._leaving = True
        self.courier.close(self.options.lock_timeout)
        try:
            if self.index is None:
                return  # never tracked: no slot was free, or the lock could not be had
            failed = _attempt(self.leadership.stop, self.index, self.token)
            # worker_exit is delivered, whatever came before; the slot freed, whatever it did
            exit_failed = _attempt(self.tx.run, "exit", self._leave, self.options.lock_timeout,
                                   self._release)
            failed = failed or exit_failed
            if failed is not None:
                raise failed  # on_error="raise", once the exit is complete
        finally:
            self.heartbeat.stop()

    def beat(self) -> None:
        """One heartbeat: one clock read, one store of the stamp, one load of the sweep deadline
        and one of the leader word (after the file's size is checked: a truncated file kills
        whoever touches its mapping).

        A change of leadership is acted on first: a leader that was stopped
        while another was elected runs ``leader_stop`` before anything else. A
        slot taken away (a sweep found this worker late) brings it back. A beat
        that itself came more than an overrun late (the machine or this process
        was frozen) judges nobody: the others may have been frozen as well.
        """
        if _lseek(self._fd, 0, _SEEK_END) != self._size:  # truncated: SIGBUS ahead
            self._stop(StateDamaged(f"state file {self.tx.file.path} changed size"))
            return
        view, now = self._view, _clock()
        try:
            if view[_LEADER] != self.leadership.seen:
                self._lead_later()
            if view[self._owner_at] != self.token:
                self._come_back()
                return
            view[self._heartbeat_at] = now
            if not self._withdrawn and not self._serving():  # Gunicorn stops it: never leads
                self._withdrawn = self._lead_later()
            late = now - self._last > self._late
            self._last = now
            if now >= view[_NEXT_SWEEP] and not late:
                self._sweep()
                if view[_LEADER] != self.leadership.seen:  # the sweep elected it, maybe
                    self._lead_later()
        except LifecycleError as exc:  # the file was overwritten: nothing here can be trusted
            self._stop(exc)

    def _until_news(self, seconds: float) -> None:
        """The heartbeat's sleep: ``seconds``, or until the leader word changes and this
        worker's slot is woken for it (it was elected: its ``leader_start`` comes at once, not
        an interval later; see :meth:`Transactions.bookkeeping`)."""
        index, deadline = self.index, time.monotonic() + seconds
        if seconds <= NEWS or index is None or _lseek(self._fd, 0, _SEEK_END) != self._size:
            threads.sleep(seconds)  # a beat comes soon anyway: a futex's wait costs more CPU
            return
        # Asleep while the word is the one the worker last acted on: a change since, even
        # one just before this sleep, wakes it at once, once per word it has not slept on yet.
        word = self._view[_LEADER]
        expected, self._slept_on = (word if word == self._slept_on else
                                    self.leadership.seen), word
        self.tx.leader_news.wait(expected, index % 32, deadline)

    def _stop(self, why: LifecycleError) -> None:
        self.heartbeat.stop()
        self.log.error("gunicorn_lifecycle: %s; the heartbeat of worker %s stops, the lifecycle "
                       "is off in it", why, self.pid)

    def _lead(self) -> None:
        try:
            self.leadership.follow(self.index, self.token)
        except LifecycleError as exc:  # as in a beat: the file was overwritten
            self._stop(exc)

    def _lead_later(self) -> bool:
        """Follow the leadership from the courier (a callback never holds up a beat); False if
        a follow is on its way already, or the worker is leaving."""
        if self.leadership.asked or self._leaving:
            return False
        self.leadership.asked = True
        self.courier.run([("leadership", self._lead)])
        return True

    def _start(self, state: State) -> list[Owed]:
        """Its own ``worker_start`` (a worker lost before it is delivered keeps it: no
        "resume")."""
        if not self._start_owed or self.index is None:
            return []
        return [WorkerStarted(self.index, self.pid, self.started, False, self.options,
                              self.server, self.worker, self._counted)]

    def _counted(self) -> None:
        """Under the lock: its start (or resume) took effect: it counts from now on, so a
        loss delivered later is told, and its return is a "resume"."""
        self._start_owed, self._was_counted = False, True

    def _boot(self, state: State) -> list[Owed]:
        if self.index is None or not self._serving():  # stopped while it waited to start
            return []
        slot = state.slot(self.index)
        if not self._is_mine(slot) or slot.state == SlotState.FREE:
            return []
        state.set_flags(self.index, slot.flags | Flag.BOOTED)
        owed = ready_if_complete(state, self.generation, self.options, self.server, self.worker)
        return [*owed, *self.leadership.owed(state, self.index, self.token)]  # elected?

    def _register(self, state: State) -> list[Owed]:
        gen = state.generation(self.generation)
        if gen is None or not gen.serving:
            self.log.error("gunicorn_lifecycle: worker %s belongs to generation %s, which is not "
                           "open; it serves untracked", self.pid, self.generation)
            return []
        index = free_slot(state, Here(state, self._fd))
        if index is None:
            self.log.error("gunicorn_lifecycle: state file %s has no free slot for worker %s "
                           "(all %s taken); it serves untracked. Remove the file while no "
                           "server runs and raise `slots`", state.path, self.pid, state.slots)
            return []
        self._own(state, index, registered=False)
        # Not booted, it cannot lead: an election before its boot is none of its business (its
        # boot follows the leadership), so its beats while the app loads do not follow it.
        self.leadership.seen = state.header(H.LEADER)
        self._start_owed = True
        return []

    def _own(self, state: State, index: int, registered: bool) -> None:
        """Register in ``index``, or, ``registered``, take the own lost slot back."""
        token, now = state.take_token(), time.monotonic_ns()
        if registered:
            state.reclaim(index, token, now)
        else:
            state.register(index, token, self.generation, self.pid, self.started, now, 0)
        self.index, self.token, self._last = index, token, now
        self._owner_at, self._heartbeat_at = slot_at(index) + S.OWNER, slot_at(index) + S.HEARTBEAT

    def _sweep(self) -> None:
        """At most once per interval node-wide, by whichever beat finds it due first."""
        try:
            with self.tx.bookkeeping("sweep", 0) as state:
                now = time.monotonic_ns()
                if now < state.header(H.NEXT_SWEEP):
                    return
                state.set_header(H.NEXT_SWEEP, now + self._interval)
                owed = sweep(state, Here(state, self._fd), self.options, self.server)
        except LockTimeout:
            return  # busy: a later beat sweeps
        self.courier.send(owed)

    def _come_back(self) -> None:
        """A sweep took this worker for lost while it was only slow: register again."""
        if self._untracked or self._leaving or self.heartbeat.stopped or self.index is None:
            return
        try:
            with self.tx.bookkeeping("resume", 0) as state:
                owed = self._resume(state, self.index)
        except LockTimeout:
            return  # busy: the next beat comes back
        self.courier.send(owed)

    def _resume(self, state: State, index: int) -> list[Owed]:
        slot = state.slot(index)
        gen = state.generation(slot.generation)
        if (not self._is_mine(slot) or slot.state == SlotState.FREE or gen is None
                or not gen.serving):
            self._untracked = True
            self.log.warning("gunicorn_lifecycle: worker %s was counted as lost while it was "
                             "stopped, and its generation %s has closed since; it serves "
                             "untracked", self.pid, self.generation)
            return []
        # Told to nobody: its loss was never delivered (or cut short), or it did not count when
        # it was lost (its start had not taken effect, or was given up): it never happened.
        untold = slot.state == SlotState.REGISTERED or slot.counted or not self._was_counted
        self._own(state, index, registered=True)
        # Back, it may complete its generation's readiness (it booted while it was lost).
        ready = ready_if_complete(state, self.generation, self.options, self.server, self.worker)
        if untold:
            if slot.state == SlotState.LOST:
                state.tally(H.LOST_TALLY, slot.reason, -1)
                count_gone(state, slot.generation, -1)
            return ready
        self.log.warning("gunicorn_lifecycle: worker %s was counted as lost (its heartbeat "
                         "overran) but is alive; registered again", self.pid)
        self._was_counted = False  # its loss was delivered: it counts again once resumed
        return [WorkerStarted(index, self.pid, self.started, True, self.options, self.server,
                              self.worker, self._counted), *ready]

    def _leave(self, state: State) -> list[Owed]:
        assert self.index is not None
        slot = state.slot(self.index)
        if not self._is_mine(slot) or slot.state == SlotState.FREE:
            return []
        if slot.state == SlotState.LOST and not slot.counted:
            self.log.info("gunicorn_lifecycle: worker %s exits after it was counted as lost",
                          self.pid)
            return []
        if slot.state == SlotState.LOST:  # found lost, but not yet told: it exits instead
            self._own(state, self.index, registered=True)
            slot = state.slot(self.index)
        # Never elected on its way out; if it leads (its leader_stop ran), another is elected.
        withdraw(state, self.index)
        if self.aborted:
            return lose(state, slot, Reason.TIMEOUT, False, self.options, self.server, self.worker)
        return [WorkerExited(self.index, self.token, self.options, self.server, self.worker)]

    def _release(self, state: State) -> list[Owed]:
        """Free the slot; an orphan that finds its master dead first closes its generation."""
        assert self.index is not None
        slot = state.slot(self.index)
        if self._is_mine(slot) and slot.state != SlotState.FREE:
            if slot.state == SlotState.REGISTERED:
                count_gone(state, slot.generation)
            state.release(self.index)
            retire_if_unused(state, slot.generation)  # the last orphan of a closed generation
        self.index = None
        gen, here = state.generation(self.generation), Here(state, self._fd)
        if gen is None or not gen.serving or here.master_alive(gen):
            return []
        return close_dead(state, gen, here, self.options, self.server)

    def _is_mine(self, slot: Slot) -> bool:
        return (slot.pid, slot.started) == (self.pid, self.started)


def _attempt(action: Callable[..., None], *args: Any) -> CallbackFailed | None:
    """Run ``action``; a callback's failure under ``on_error="raise"`` is returned instead of
    raised, so that the exit it interrupts still completes (else the worker counts as lost)."""
    try:
        action(*args)
    except CallbackFailed as failed:
        return failed
    return None
