"""The turn: one user callback at a time node-wide, in the order they were asked for.

A thread with callbacks to run *asks* for the turn: under the state lock it
takes the next ticket (header word NEXT_TICKET) and writes who it is into that
ticket's entry of the queue (:class:`~.layout.Q`). The turn belongs to the
ticket SERVING. Its holder runs its callbacks, then *leaves* under the lock: it
clears its entry and moves SERVING to the next ticket whose process can take
it, then wakes that ticket's waiter. A waiter sleeps in the kernel on the
SERVING word (:mod:`futex`): no poll, no sleep that could outlast a handover.
Tickets are served in the order they were given: a newcomer never overtakes
a waiter, however often it comes back.

What is written, by whom (every write under the state lock, but one):

=====================================  ==========================================
an entry: PID, STARTED, WHAT, TICKET   the asking thread, TICKET last
an entry's TICKET := 0                 its thread on leaving (without the lock
                                       too, when the lock cannot be had); anyone
                                       who finds its process dead
SERVED_SINCE, then SERVING             whoever leaves, or passes over the holder
=====================================  ==========================================

What a waiter reads without the lock: SERVING (one word: is it mine yet?),
SERVED_SINCE (one word: since when the holder holds), and the holder's entry,
copied between two loads of its TICKET: the PID and STARTED read between two
loads that both found the holder's ticket are that ticket's (TICKET is stored
last when an entry is filled, first when it is cleared). A waiter acts on
none of it alone: it only decides whether to look again under the lock.

The turn *passes over* a holder whose process is dead (its pid no longer runs
with the recorded start time), whose entry no longer names its ticket, or that
is stopped (SIGSTOP, a debugger) and that a sweep found lost, as a frozen
leader is replaced: if it runs again, its callback finishes while another may
run. A holder that is only slow (the GIL held for seconds) keeps the turn. A
waiter that died is skipped when its ticket comes. A waiter that was passed
over (it was stopped) asks again, at the back.

A waiter *gives up* only when the holder has held the turn for longer than the
waiter's timeout (the holder made no progress: it is frozen), never because
others kept arriving; a newcomer that finds the holder frozen gives up at once,
without a ticket. A waiter also stops when it is told to (a worker that
Gunicorn stops while it waits to start). Whoever ends its wait, by any way,
leaves: an exception a signal handler raises meanwhile included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from .futex import Futex
from .layout import QUEUE_WORDS, WHAT, H, Q, SlotState, entry_at, queue_at, queue_size
from .lock import LockTimeout
from .process import is_alive, is_stopped, runs
from .state import State
from .statefile import StateFile

CHECK = 0.1  # how often a waiter looks whether the holder still lives, in seconds

Section = Callable[[str, float], AbstractContextManager[State]]


class TurnTimeout(Exception):
    """The turn was not had: its holder (the ticket ``holder``; 0: the lock could not be had)
    made no progress for the timeout. ``ticket``: the one given up, to leave (0: none)."""

    def __init__(self, message: str, holder: int = 0, ticket: int = 0) -> None:
        super().__init__(message)
        self.holder = holder
        self.ticket = ticket


class Cancelled(Exception):
    """The wait for the turn was called off by the caller's ``cancel``; ``args[1]`` is the
    ticket given up, to leave."""


class Turn:
    """One process's way to the node-wide turn; any of its threads may wait at once.

    A caller asks and leaves within a lock hold of its own (``ask``, ``leave``: the
    turn shares the hold with the caller's bookkeeping), waits outside any
    (``wait``), and wakes the next in line once its hold is over (``wake``).
    """

    def __init__(self, file: StateFile, section: Section, pid: int, started: int) -> None:
        self.file = file
        self.section = section  # the state lock, on a checked and repaired state
        self.pid, self.started = pid, started
        self._view = file.words.view
        self._futex: Futex | None = None

    def after_fork(self, pid: int, started: int) -> None:
        """In a forked child: its own identity."""
        self.pid, self.started = pid, started

    def ask(self, state: State, what: str, timeout: float) -> int:
        """Under the lock: a ticket for ``what`` (see :func:`ask`)."""
        return ask(state, self.pid, self.started, WHAT.index(what), timeout)

    def served(self, ticket: int) -> bool:
        """Whether ``ticket`` holds the turn (one load, without the lock)."""
        return bool(self._view[H.SERVING] == ticket)

    def leave(self, state: State, ticket: int) -> int | None:
        """Under the lock: done with ``ticket``; the ticket to :meth:`wake` once the lock is
        released, if the turn moved."""
        return leave(state, ticket)

    def leave_alone(self, ticket: int, timeout: float) -> None:
        """Done with ``ticket``, outside any lock hold of the caller's (an error unwinds it)."""
        try:
            with self.section("turn", max(timeout, 1.0)) as state:
                moved = leave(state, ticket)
        except LockTimeout:
            # One store without the lock: the entry no longer names the ticket, so whoever
            # waits passes the turn on from it once the lock can be had.
            at = self._entry(ticket)
            if self.file.intact() and self._view[at + Q.TICKET] == ticket:
                self._view[at + Q.TICKET] = 0
            return
        self.wake(moved)

    def wait(self, ticket: int, what: str, timeout: float,
             cancel: Callable[[], bool] | None = None) -> int:
        """Until ``ticket`` is served; the ticket that holds the turn then (a waiter passed
        over asks again, at the back). TurnTimeout when the holder made no progress for
        ``timeout`` seconds, Cancelled as soon as ``cancel()`` is true: the ticket given
        up is then to be left, like a served one."""
        view, limit = self._view, int(timeout * 1e9)
        while True:
            self.file.verify()  # before the mapping is touched (StateDamaged)
            serving = view[H.SERVING]
            if serving == ticket:
                return ticket
            if serving > ticket:  # passed over while this process was stopped: to the back
                self.leave_alone(ticket, timeout)
                ticket = self._ask_alone(what, timeout)
                continue
            if cancel is not None and cancel():
                raise Cancelled(what, ticket)
            since, holder = view[H.SERVED_SINCE], self._holder(serving)
            if view[H.SERVING] != serving:
                continue
            if (holder is None or not runs(*holder)) and self._pass_over(serving, timeout):
                continue
            now = time.monotonic_ns()
            if now - since > limit:
                if view[H.SERVING] == ticket:
                    return ticket
                raise TurnTimeout(f"gave up on the turn for {what} in pid {self.pid} after "
                                  f"{timeout:.1f}s: {self.holder_name()} has held it for "
                                  f"{(now - since) / 1e9:.1f}s", serving, ticket)
            deadline = min(now + int(CHECK * 1e9), since + limit + 1) / 1e9
            self._wake_on().wait(serving, ticket % 32, deadline)

    def wake(self, ticket: int | None) -> None:
        """Wake the waiter of ``ticket``, to which the turn moved (nothing for None)."""
        if ticket is not None and self.file.intact() and ticket < self._view[H.NEXT_TICKET]:
            self._wake_on().wake(ticket % 32)

    def _ask_alone(self, what: str, timeout: float) -> int:
        try:
            with self.section("turn", timeout) as state:
                return self.ask(state, what, timeout)
        except LockTimeout as exc:
            raise TurnTimeout(f"gave up on the turn for {what}: {exc}") from None

    def _holder(self, serving: int) -> tuple[int, int] | None:
        """The pid and start time of the holder's entry, read without the lock; None when it
        no longer names ``serving`` (see the module's docstring)."""
        view, at = self._view, self._entry(serving)
        if view[at + Q.TICKET] != serving:
            return None
        pid, started = view[at + Q.PID], view[at + Q.STARTED]
        return (pid, started) if view[at + Q.TICKET] == serving else None

    def holder_name(self) -> str:
        """Who holds the turn, as its entry says (for messages)."""
        return named(self._view, self._entry(self._view[H.SERVING]))

    def _pass_over(self, serving: int, timeout: float) -> bool:
        try:
            with self.section("turn", timeout) as state:
                moved = pass_over(state, serving)
        except LockTimeout:
            return False
        self.wake(moved)
        return moved is not None

    def _wake_on(self) -> Futex:
        if self._futex is None:
            self._futex = Futex(self.file.mapping, H.SERVING)
        return self._futex

    def _entry(self, ticket: int) -> int:
        return entry_at(self.file.slots, ticket)


# The rules, run under the state lock.


def ask(state: State, pid: int, started: int, what: int, timeout: float) -> int:
    """A new ticket for the thread of ``pid``; TurnTimeout, without one, if the holder is
    frozen (it has held the turn for longer than ``timeout``)."""
    view, size = state.words.view, queue_size(state.slots)
    serving, ticket = view[H.SERVING], view[H.NEXT_TICKET]
    now = time.monotonic_ns()
    if serving < ticket and can_hold(state, serving) and now - view[H.SERVED_SINCE] > timeout * 1e9:
        raise TurnTimeout(f"gave up on the turn for {WHAT[what]} in pid {pid} at once: "
                          f"{named(view, entry_at(state.slots, serving))} has held it for "
                          f"{(now - view[H.SERVED_SINCE]) / 1e9:.1f}s (more than "
                          f"lock_timeout={timeout:g}s)", serving)
    at = entry_at(state.slots, ticket)
    older = view[at + Q.TICKET]
    if serving <= older < ticket and can_hold(state, older):
        raise TurnTimeout(f"gave up on the turn for {WHAT[what]} in pid {pid}: its queue in "
                          f"{state.path} is full ({size} waiting)")
    view[at + Q.PID], view[at + Q.STARTED], view[at + Q.WHAT] = pid, started, what
    view[at + Q.TICKET] = ticket
    if serving == ticket:  # nobody holds it, nobody waits: it is this thread's at once
        view[H.SERVED_SINCE] = now
    view[H.NEXT_TICKET] = ticket + 1
    return ticket


def leave(state: State, ticket: int) -> int | None:
    """The thread of ``ticket`` is done with the turn, or with waiting for it; the ticket the
    turn moved to, if it held it."""
    view, at = state.words.view, entry_at(state.slots, ticket)
    if view[at + Q.TICKET] == ticket:
        view[at + Q.TICKET] = 0
    return advance(state, ticket) if view[H.SERVING] == ticket else None


def pass_over(state: State, serving: int) -> int | None:
    """If ``serving`` still holds the turn but cannot (see the module's docstring), move the
    turn on; the ticket it moved to."""
    view = state.words.view
    if view[H.SERVING] != serving or can_hold(state, serving):
        return None
    at = entry_at(state.slots, serving)
    if view[at + Q.TICKET] == serving and is_alive(view[at + Q.PID], view[at + Q.STARTED]):
        state.note("gunicorn_lifecycle: %s holds the turn but is stopped, found lost by its "
                   "heartbeat; the others' callbacks go on without it", named(view, at))
    return advance(state, serving)


def advance(state: State, serving: int) -> int:
    """Give the turn to the first ticket after ``serving`` whose process can take it (the
    entries of dead ones are cleared on the way); SERVING is stored last."""
    view = state.words.view
    ticket, end = serving + 1, view[H.NEXT_TICKET]
    while ticket < end:
        at = entry_at(state.slots, ticket)
        if view[at + Q.TICKET] == ticket:
            if can_hold(state, ticket):
                break
            view[at + Q.TICKET] = 0
        ticket += 1
    view[H.SERVED_SINCE] = time.monotonic_ns()
    view[H.SERVING] = ticket
    return ticket


def can_hold(state: State, ticket: int) -> bool:
    """Whether the thread of ``ticket`` can hold the turn: its entry names the ticket, its
    process runs, and is not stopped and found lost by a sweep."""
    view, at = state.words.view, entry_at(state.slots, ticket)
    pid, started = view[at + Q.PID], view[at + Q.STARTED]
    if view[at + Q.TICKET] != ticket or not is_alive(pid, started):
        return False
    return not (is_stopped(pid) and any((s.pid, s.started) == (pid, started)
                                        for s in state.slots_in(SlotState.LOST)))


def reset(state: State) -> None:
    """Nobody holds or waits (a new boot: every process of the old one is gone)."""
    view, queue = state.words.view, queue_at(state.slots)
    for index in range(queue_size(state.slots)):
        view[queue + index * QUEUE_WORDS + Q.TICKET] = 0
    view[H.SERVING] = view[H.NEXT_TICKET]


def is_free(state: State) -> bool:
    """Nobody holds the turn, nobody waits for it."""
    return state.words.view[H.SERVING] == state.words.view[H.NEXT_TICKET]


def named(view: memoryview, at: int) -> str:
    """The thread of the entry at ``at``, as it named itself: its pid and what it runs."""
    what = view[at + Q.WHAT]
    return f"pid {view[at + Q.PID]} ({WHAT[what] if 0 <= what < len(WHAT) else '?'})"
