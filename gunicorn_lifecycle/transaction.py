"""How a process gets at the state: bookkeeping under the lock, user callbacks in turn.

*Bookkeeping* (register, reap, sweep, open, close) holds the state lock for
microseconds, and never waits on a user callback. The events it finds are
*owed* (:mod:`lifecycle`); a *delivery* takes the node-wide *turn*
(:mod:`turn`), so that no two user callbacks run at once anywhere, then the
lock just long enough to make the event's effect on the counts and read them,
then runs the callbacks with the turn alone. An event without a callback takes
no turn.

No signal is ever masked. A hook that a signal handler calls inside another
(Gunicorn 21 to 23 reap workers, and call ``child_exit``, from their SIGCHLD
handler) is deferred: its bookkeeping until the interrupted bookkeeping ends,
its deliveries until the interrupted delivery ends (:meth:`Transactions.perform`).
An exception a signal handler raises inside bookkeeping (a worker's quick exit)
unwinds it like a kill would: the next lock holder repairs the record.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

from . import threads
from .errors import LifecycleError
from .events import Log, run_callbacks
from .layout import WHAT, H
from .leader import keep
from .lifecycle import Owed
from .lock import LockTimeout, StateLock
from .options import CALLBACKS
from .process import own_start_time
from .state import State
from .statefile import StateFile
from .systemd import Systemd
from .turn import Cancelled, Turn, TurnTimeout

Work = Callable[[State], Sequence[Owed]]


class Transactions:
    """One process's way into one state file."""

    def __init__(self, file: StateFile, log: Log, systemd: Systemd | None = None) -> None:
        self.file = file
        self.systemd = systemd
        self.state = State(file.words)
        self.lock = StateLock(file)
        self.log = log
        self.pid = os.getpid()
        self.started = own_start_time()
        self.turn = Turn(file, self.bookkeeping, self.pid, self.started)
        self._inside: set[int] = set()  # threads in bookkeeping now
        self._work: deque[tuple[str, Work, float]] = deque()
        self._owed: deque[Owed] = deque()
        self._delivering = False
        self._told_frozen = 0  # the frozen holder a "stays owed" was logged for

    def after_fork(self) -> None:
        """In a forked worker (whose descriptor was reopened at the fork, see
        :mod:`statefile`): its own identity, lock and queues."""
        self.pid = os.getpid()
        self.started = own_start_time()
        self.lock.after_fork()
        self.turn.after_fork(self.pid, self.started)
        self._inside.clear()
        self._work.clear()
        self._owed.clear()
        self._delivering = False

    @contextmanager
    def bookkeeping(self, what: str, timeout: float) -> Iterator[State]:
        """Hold the state lock for ``what``, on a checked and repaired state.

        What the section noted is logged, and what it marked told to systemd
        (with the counts, after a delivery), once the lock is released. Every
        section ends with a leader that can lead, or none (:func:`leader.keep`).
        """
        me = threads.get_ident()
        said = ""
        try:
            self._inside.add(me)
            with self.lock.hold(timeout, what, self._holder):
                self.file.verify()
                self.state.words.repair()
                self.state.set_header(H.HOLDER_PID, self.pid)
                self.state.set_header(H.HOLDER_WHAT, WHAT.index(what))
                yield self.state
                keep(self.state)
                if self.systemd is not None:
                    said = self.systemd.message(self.state, self.state.moments,
                                                changed=what in CALLBACKS
                                                or self.state.counts_changed)
        finally:
            notes, self.state.notes, self.state.moments = self.state.notes, [], []
            self.state.counts_changed = False
            try:
                for message, args in notes:
                    self.log.warning(message, *args)
                if said and self.systemd is not None:
                    self.systemd.send(said)
            finally:  # a hook that a signal handler runs meanwhile is still deferred
                self._inside.discard(me)

    def perform(self, what: str, work: Work, timeout: float) -> None:
        """Do ``work`` under the lock, then deliver the events it owes, in order.

        For the hooks of a master's main thread, which a signal handler may enter
        again: nothing nests (see the module's docstring).
        """
        self._work.append((what, work, timeout))
        if threads.get_ident() in self._inside:
            return  # inside our bookkeeping: the outer call does it when that ends
        self._bookkeep()
        while self._owed and not self._delivering:  # inside a delivery: the outer loop delivers
            self._delivering = True
            try:
                while self._owed:
                    self.deliver(self._owed.popleft())
                    self._bookkeep()
            finally:
                self._delivering = False

    def _bookkeep(self) -> None:
        while self._work:
            what, work, timeout = self._work.popleft()
            if self._owed or self._delivering:  # events owed before: these come after them
                with self.bookkeeping(what, timeout) as state:
                    self._owed.extend(work(state))
            else:
                self._owed.extend(self.section(what, work, timeout))

    def section(self, what: str, work: Work, timeout: float) -> list[Owed]:
        """Do ``work`` under the lock; the events it owes, to deliver in order.

        Those that nobody is told of (no callback), up to the first that
        somebody is, take their effect at once, in the same section: a hook
        without callbacks holds the lock once, not once more per event.
        """
        with self.bookkeeping(what, timeout) as state:
            owed = list(work(state))
            while owed and not owed[0].options.callbacks(owed[0].callback):
                owed.pop(0).take(state, tell=False)
                state.counts_changed = True
        return owed

    def deliver_all(self, owed: Iterable[Owed]) -> None:
        for one in owed:
            self.deliver(one)

    def deliver(self, owed: Owed, cancel: Callable[[], bool] | None = None) -> None:
        """Make the event's effect and run its callbacks, in turn; skipped if no longer owed.

        Without the turn (its holder made no progress for ``lock_timeout``, or the
        lock could not be had), an end is still counted, its callback skipped; a
        start is not counted at all, so that nobody gets an end whose start they
        never saw (the worker or generation stays out of the counts); a ready or
        a leadership, which change no count, stay owed, for a later sweep or beat.
        ``cancel``: a start whose wait is called off (Gunicorn stops the worker)
        is left out of the counts the same way, without a word.
        """
        options = owed.options
        callbacks = options.callbacks(owed.callback)
        if not callbacks:
            with self.bookkeeping(owed.callback, options.lock_timeout) as state:
                owed.take(state, tell=False)
            return
        try:
            with self.turn.held(owed.callback, options.lock_timeout, cancel):
                with self.bookkeeping(owed.callback, options.lock_timeout) as state:
                    event = owed.take(state)
                if event is not None:
                    run_callbacks(owed.callback, callbacks, event, options.on_error, self.log)
        except Cancelled:
            return
        except (TurnTimeout, LockTimeout) as exc:
            self._without_turn(owed, exc)

    def _without_turn(self, owed: Owed, exc: TurnTimeout | LockTimeout) -> None:
        """What a delivery that did not get its turn leaves (see :meth:`deliver`)."""
        if owed.callback in ("master_ready", "leader_start"):
            holder = getattr(exc, "holder", 0)
            if not holder or holder != self._told_frozen:  # not again at each retry
                self._told_frozen = holder
                self.log.error("gunicorn_lifecycle: %s; %s stays owed: a later sweep or beat "
                               "delivers it", exc, owed.callback)
            return
        if owed.callback.endswith("_start"):
            self.log.error("gunicorn_lifecycle: %s; no %s callback: what it starts stays out "
                           "of the counts and gets no end event", exc, owed.callback)
            return
        self.log.error("gunicorn_lifecycle: %s; the %s callback is skipped, its event counted",
                       exc, owed.callback)
        try:
            with self.bookkeeping(owed.callback, owed.options.lock_timeout) as state:
                owed.take(state, tell=False)
        except LockTimeout as again:  # the lock is stuck: the end stays owed, for a sweep
            self.log.error("gunicorn_lifecycle: %s", again)

    def _holder(self) -> str:
        try:
            self.file.verify()
        except LifecycleError:
            return "a process this one cannot name (the file changed under it)"
        return _named(self.state.header(H.HOLDER_PID), self.state.header(H.HOLDER_WHAT))


def _named(pid: int, what: int) -> str:
    """A holder of the lock, as the header records it: its pid and what it does."""
    return f"pid {pid} ({WHAT[what] if 0 <= what < len(WHAT) else '?'})"


class Courier:
    """Delivers, from a real thread of its own, what a worker's heartbeat found.

    The beat never waits on a user callback: a slow ``worker_lost`` would stop
    the stamps of the worker that found the loss, and make it look lost too.
    One courier thread at most, started when there is mail, gone when there is
    none. A worker that exits closes it: the delivery under way ends first, and
    mail not yet delivered stays owed in the state, for the next sweep anywhere.
    """

    def __init__(self, transactions: Transactions, log: Log) -> None:
        self._transactions = transactions
        self._log = log
        self._mail: deque[tuple[str, Callable[[], None]]] = deque()
        self._guard = threads.allocate_lock()
        self._delivering = threads.allocate_lock()
        self._running = self._closed = False

    def send(self, owed: Sequence[Owed]) -> None:
        """Deliver ``owed``; a delivery still waiting for its turn when the worker exits stops
        waiting (what it owes stays owed in the state, for the next sweep anywhere)."""
        if owed:  # a sweep that found nothing, nearly every one, takes no lock of ours
            self.run([(one.callback, partial(self._transactions.deliver, one,
                                             lambda: self._closed)) for one in owed])

    def run(self, jobs: Iterable[tuple[str, Callable[[], None]]]) -> None:
        """Run each ``(what, job)`` in the courier's thread, in order."""
        with self._guard:
            if self._closed:
                return
            self._mail.extend(jobs)
            if not self._mail or self._running:
                return
            self._running = True
        threads.start_new_thread(self._run, ())

    def close(self, timeout: float) -> None:
        """Take no more mail; wait up to ``timeout`` for the delivery under way."""
        with self._guard:
            self._closed = True
            self._mail.clear()
        if self._delivering.acquire(True, timeout):
            self._delivering.release()

    def _run(self) -> None:
        while True:
            with self._guard:
                if not self._mail:
                    self._running = False
                    return
                what, job = self._mail.popleft()
                self._delivering.acquire()
            try:
                job()
            except (LockTimeout, LifecycleError) as exc:  # said in full: no traceback to add
                self._log.error("gunicorn_lifecycle: %s", exc)
            except Exception:
                self._log.exception("gunicorn_lifecycle: delivering %s failed", what)
            finally:
                self._delivering.release()
