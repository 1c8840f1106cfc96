"""How a process gets at the state: bookkeeping under the lock, user callbacks in turn.

*Bookkeeping* (register, reap, sweep, open, close) holds the state lock for
microseconds, and never waits on a user callback. The events it finds are
*owed* (:mod:`lifecycle`). A *run* (:meth:`Transactions.run`) does a piece of
bookkeeping and delivers what it owes, in order: an event with callbacks first
takes the node-wide *turn* (:mod:`turn`), so that no two user callbacks run at
once anywhere, then its effect on the counts is made and the counts read, then
its callbacks run with the turn alone. An event without a callback takes no
turn. Each lock hold of a run goes as far as it can: the bookkeeping, the
events without callbacks, the ask for the turn and, when nobody holds it, the
first event's effect share one hold; the turn is kept until the run's last
event is delivered, and given back in the hold of the run's closing bookkeeping.

No signal is ever masked. A hook that a signal handler calls inside another
(Gunicorn 21 to 23 reap workers, and call ``child_exit``, from their SIGCHLD
handler) does not nest (:meth:`Transactions.perform`): its bookkeeping waits
for the lock hold it interrupted, its events for the delivery under way. An
exception a signal handler raises inside bookkeeping (a worker's quick exit)
unwinds it like a kill would: the next lock holder repairs the record.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import cast

from . import threads
from .errors import LifecycleError
from .events import CallbackFailed, Event, Log, run_callbacks
from .futex import Futex
from .layout import WHAT, H, index_of
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


@dataclass(frozen=True)
class _Do:
    """A run's step of bookkeeping: ``work`` under the lock. Its events come next, or, ``last``,
    after every event owed before (bookkeeping a signal handler asked for meanwhile)."""

    work: Work
    last: bool = False


@dataclass(frozen=True)
class _Quietly:
    """A run's step: ``owed`` takes its effect with no callback (its turn was not had)."""

    owed: Owed


Step = Owed | _Do | _Quietly


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
        self._plan: deque[Step] | None = None  # perform's run under way
        self._told_frozen = 0  # the frozen holder a "stays owed" was logged for
        self._leader_news: Futex | None = None

    def after_fork(self) -> None:
        """In a forked worker (whose descriptor was reopened at the fork, see
        :mod:`statefile`): its own identity and lock."""
        self.pid = os.getpid()
        self.started = own_start_time()
        self.lock.after_fork()
        self.turn.after_fork(self.pid, self.started)
        self._inside.clear()
        self._plan = None

    @contextmanager
    def bookkeeping(self, what: str, timeout: float) -> Iterator[State]:
        """Hold the state lock for ``what``, on a checked and repaired state.

        What the section noted is logged, and what it marked told to systemd
        (with the counts, after a delivery), once the lock is released. Every
        section ends with a leader that can lead, or none (:func:`leader.keep`).
        """
        me = threads.get_ident()
        said = ""
        elected = None
        try:
            self._inside.add(me)
            with self.lock.hold(timeout, what, self._holder):
                self.file.verify()
                self.state.words.repair()
                self.state.set_header(H.HOLDER_PID, self.pid)
                self.state.set_header(H.HOLDER_WHAT, WHAT.index(what))
                leader = self.state.header(H.LEADER)
                yield self.state
                keep(self.state)
                if self.state.header(H.LEADER) != leader:
                    elected = index_of(self.state.header(H.LEADER))
                if self.systemd is not None:
                    said = self.systemd.message(self.state, self.state.moments,
                                                changed=what in CALLBACKS
                                                or self.state.counts_changed)
        finally:
            notes, self.state.notes, self.state.moments = self.state.notes, [], []
            self.state.counts_changed = False
            try:
                if elected is not None and self.file.intact():  # its beat comes now
                    self.leader_news.wake(elected % 32)
                for message, args in notes:
                    self.log.warning(message, *args)
                if said and self.systemd is not None:
                    self.systemd.send(said)
            finally:  # a hook that a signal handler runs meanwhile is still deferred
                self._inside.discard(me)

    @property
    def leader_news(self) -> Futex:
        """The futex on the LEADER word: an elected worker's heartbeat sleeps on it."""
        if self._leader_news is None:
            self._leader_news = Futex(self.file.mapping, H.LEADER)
        return self._leader_news

    def perform(self, what: str, work: Work, timeout: float) -> None:
        """:meth:`run`, for the hooks of a master's main thread, which a signal handler may
        enter again while a run is under way: then nothing nests (see the module)."""
        plan = self._plan
        if plan is not None and threads.get_ident() in self._inside:  # right after its step
            plan.appendleft(_Do(work, last=True))
        elif plan is not None:  # in a callback, or waiting for the turn: bookkeeping now
            with self.bookkeeping(what, timeout) as state:
                plan.extend(work(state))
        else:
            plan, first = deque(), work
            while True:
                self._plan = plan
                try:
                    self.run(what, first, timeout, plan=plan)
                finally:
                    self._plan = None
                if not plan:
                    return
                first = _nothing  # what a signal handler added as the run ended: delivered

    def run(self, what: str, work: Work, timeout: float, then: Work | None = None,
            cancel: Callable[[], bool] | None = None, plan: deque[Step] | None = None) -> None:
        """Do ``work`` under the lock, deliver the events it owes in order, then do ``then``
        under the lock and deliver what that owes (see the module for the lock holds).

        The turn is kept from one event to the next unless another thread waits
        for it: then it is handed over, and asked for again, at the back.
        ``cancel``: an event whose wait for the turn it calls off is dropped (a
        start stays out of the counts). A callback that raises under
        ``on_error="raise"`` ends its own delivery, not the run: the rest is done,
        then its error is raised. Without the turn an event is left as
        :meth:`_without_turn` says; without the lock the run ends there with a
        LockTimeout, and what it owes stays owed in the state, for a sweep.
        """
        steps: deque[Step] = deque() if plan is None else plan
        steps.extendleft([_Do(work), *([_Do(then)] if then is not None else [])][::-1])
        failed = None
        used = [False]  # an event was delivered under this thread's ticket
        try:
            while steps or self.turn.mine():
                gave_up: list[tuple[Owed, TurnTimeout]] = []
                moved: list[int | None] = []
                with self.bookkeeping(what, timeout) as state:
                    ready = self._hold(state, steps, used, gave_up, moved)
                    if not steps and ready is None and self.turn.mine():  # all delivered
                        moved.append(self.turn.leave(state))
                for ticket in moved:
                    self.turn.wake(ticket)
                for owed, exc in gave_up:
                    self._without_turn(owed, exc)
                if ready is not None:
                    owed, event = ready
                    try:
                        run_callbacks(owed.callback, owed.options.callbacks(owed.callback),
                                      event, owed.options.on_error, self.log)
                    except CallbackFailed as exc:
                        failed = failed or exc
                elif steps and not isinstance(steps[0], _Do | _Quietly):  # it waits its turn
                    self._wait(steps, cancel)
                    used[0] = False
        finally:
            self.turn.leave_alone(timeout)
        if failed is not None:
            raise failed

    def _hold(self, state: State, steps: deque[Step], used: list[bool],
              gave_up: list[tuple[Owed, TurnTimeout]], moved: list[int | None]
              ) -> tuple[Owed, Event] | None:
        """Under the lock: take ``steps`` as far as they go without waiting; the event whose
        callbacks run next, if any."""
        while steps:
            step = steps[0]
            if isinstance(step, _Do):
                steps.popleft()
                found = step.work(state)
                if step.last:
                    steps.extend(found)
                else:
                    steps.extendleft(reversed(found))
                continue
            if isinstance(step, _Quietly):
                steps.popleft()
                step.owed.take(state, tell=False)
                state.counts_changed = True
                continue
            callbacks = step.options.callbacks(step.callback)
            if callbacks and used[0] and self.turn.others_wait(state):  # to the back
                moved.append(self.turn.leave(state))
                used[0] = False
            if callbacks and not self.turn.mine():
                try:
                    self.turn.ask(state, step.callback, step.options.lock_timeout)
                except TurnTimeout as exc:
                    steps.popleft()
                    gave_up.append((step, exc))
                    if _counted_without_turn(step):
                        steps.appendleft(_Quietly(step))
                    continue
            if callbacks and not self.turn.served():
                return None
            steps.popleft()
            event = step.take(state, tell=bool(callbacks))
            state.counts_changed = True
            if callbacks:
                self.turn.progress(state, step.callback)
                used[0] = True
            if event is not None:
                return step, event
        return None

    def _wait(self, steps: deque[Step], cancel: Callable[[], bool] | None) -> None:
        """Wait for the turn for ``steps[0]``; given up, the step is left as
        :meth:`_without_turn` says (a cancelled one is dropped)."""
        owed = cast(Owed, steps[0])
        timeout = owed.options.lock_timeout
        try:
            self.turn.wait(owed.callback, timeout, cancel)
        except (TurnTimeout, Cancelled) as exc:
            self.turn.leave_alone(timeout)
            steps.popleft()
            if isinstance(exc, TurnTimeout):
                self._without_turn(owed, exc)
                if _counted_without_turn(owed):
                    steps.appendleft(_Quietly(owed))

    def _without_turn(self, owed: Owed, exc: TurnTimeout) -> None:
        """Say what an event without its turn leaves: an end is still counted, its callback
        skipped; a start is not counted at all, so that nobody gets an end whose start they
        never saw; a ready or a leadership, which change no count, stay owed, for a later
        sweep or beat."""
        if owed.callback in ("master_ready", "leader_start"):
            if not exc.holder or exc.holder != self._told_frozen:  # not again at each retry
                self._told_frozen = exc.holder
                self.log.error("gunicorn_lifecycle: %s; %s stays owed: a later sweep or beat "
                               "delivers it", exc, owed.callback)
        elif owed.callback.endswith("_start"):
            self.log.error("gunicorn_lifecycle: %s; no %s callback: what it starts stays out "
                           "of the counts and gets no end event", exc, owed.callback)
        else:
            self.log.error("gunicorn_lifecycle: %s; the %s callback is skipped, its event "
                           "counted", exc, owed.callback)

    def _holder(self) -> str:
        try:
            self.file.verify()
        except LifecycleError:
            return "a process this one cannot name (the file changed under it)"
        return _named(self.state.header(H.HOLDER_PID), self.state.header(H.HOLDER_WHAT))


def _nothing(state: State) -> list[Owed]:
    return []


def _counted_without_turn(owed: Owed) -> bool:
    """An end is counted even when its callback cannot run (see ``_without_turn``)."""
    return not (owed.callback in ("master_ready", "leader_start") or
                owed.callback.endswith("_start"))


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
        """Deliver ``owed``, in one run; one still waiting for its turn when the worker exits
        stops waiting (what it owes stays owed in the state, for the next sweep anywhere)."""
        if owed:  # a sweep that found nothing, nearly every one, takes no lock of ours
            found = list(owed)
            self.run([(found[0].callback, partial(
                self._transactions.run, found[0].callback, lambda state: found,
                found[0].options.lock_timeout, cancel=lambda: self._closed))])

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
