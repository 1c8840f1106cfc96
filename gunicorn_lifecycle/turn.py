"""The turn: one user callback at a time node-wide, in the order they were asked for.

A thread with callbacks to run *asks* for the turn: under the state lock it
takes the next ticket (header word NEXT_TICKET) and writes who it is into that
ticket's entry of the queue (:class:`~.layout.Q`). The turn belongs to the
ticket SERVING. Its holder runs its callbacks, then *leaves* under the lock: it
clears its entry and moves SERVING to the next ticket whose process can take
it, then wakes that ticket's waiter. A waiter sleeps in the kernel on the
SERVING word (:mod:`futex`): no poll, no sleep that could outlast a handover.
Tickets are served in the order they were given: a newcomer never overtakes
a waiter, however often it comes back. A holder with several events to deliver
keeps the turn from one to the next only while nobody waits; else it leaves
and asks again, at the back (:meth:`.Transactions.run`).

What is written, by whom (every write under the state lock, but one):

=====================================  ==========================================
an entry: PID, STARTED, WHAT, TICKET   the asking thread, TICKET last
an entry's TICKET := 0                 its thread on leaving (without the lock
                                       too, when the lock cannot be had); anyone
                                       who finds its process dead
SERVED_SINCE, then SERVING             whoever leaves, or passes over the holder
SERVED_SINCE, the holder's WHAT        the holder, as each of its events is taken
=====================================  ==========================================

What a waiter reads without the lock: SERVING (one word: is it mine yet?),
SERVED_SINCE (one word: since when the holder made progress), the slots'
PID, STARTED and STATE words (is a stopped holder found lost?), and the holder's entry,
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

A waiter *gives up* only when the holder has made no progress (taken no event)
for longer than the waiter's timeout, as the lock confirms: it is frozen; never
because others kept arriving. A newcomer that finds the holder frozen gives up
at once, without a ticket. A waiter also stops when it is told to (a worker that
Gunicorn stops while it waits to start). Whoever ends its wait, by any way,
leaves: an exception a signal handler raises meanwhile included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from . import threads
from .futex import Futex
from .layout import (
    QUEUE_WORDS,
    SLOT_WORDS,
    SLOTS_AT,
    WHAT,
    H,
    Q,
    S,
    SlotState,
    entry_at,
    queue_at,
    queue_size,
)
from .lock import LockTimeout
from .process import condition
from .state import State
from .statefile import StateFile

CHECK = 0.1  # how often a waiter looks whether the holder still lives, in seconds

Section = Callable[[str, float], AbstractContextManager[State]]


class TurnTimeout(Exception):
    """The turn was not had: its holder (the ticket ``holder``; 0: the lock could not be had)
    made no progress for the timeout."""

    def __init__(self, message: str, holder: int = 0) -> None:
        super().__init__(message)
        self.holder = holder


class Cancelled(Exception):
    """The wait for the turn was called off by the caller's ``cancel``."""


class Turn:
    """One process's way to the node-wide turn; any of its threads may hold or wait for it.

    A thread asks and leaves within lock holds of its own (``ask``, ``leave``:
    the turn shares them with the caller's bookkeeping), waits outside any
    (``wait``), and wakes the next in line once its hold is over (``wake``).
    Its ticket is recorded here before anything of it is written to the state,
    so that whatever interrupts the thread (an exception a signal handler
    raises) can still leave it (``leave_alone``).
    """

    def __init__(self, file: StateFile, section: Section, pid: int, started: int) -> None:
        self.file = file
        self.section = section  # the state lock, on a checked and repaired state
        self.pid, self.started = pid, started
        self._view = file.words.view
        self._futex: Futex | None = None
        self._tickets: dict[int, int] = {}  # thread -> its ticket, asked for and not left

    def after_fork(self, pid: int, started: int) -> None:
        """In a forked child: its own identity; the parent's threads hold nothing here."""
        self.pid, self.started = pid, started
        self._tickets = {}

    def mine(self) -> int:
        """This thread's ticket (0: none)."""
        return self._tickets.get(threads.get_ident(), 0)

    def ask(self, state: State, what: str, timeout: float) -> None:
        """Under the lock: a ticket for ``what`` (see :func:`ask`); TurnTimeout, without one,
        when the holder is frozen."""
        me = threads.get_ident()
        self._tickets[me] = state.words.view[H.NEXT_TICKET]  # before the state has it
        try:
            ask(state, self.pid, self.started, WHAT.index(what), timeout)
        except TurnTimeout:
            del self._tickets[me]
            raise

    def served(self) -> bool:
        """Whether this thread's ticket holds the turn (one load, without the lock)."""
        return bool(self._view[H.SERVING] == self.mine() != 0)

    def others_wait(self, state: State) -> bool:
        """Under the lock: whether a later ticket waits behind this thread's."""
        return bool(state.words.view[H.NEXT_TICKET] > self.mine() + 1)

    def progress(self, state: State, what: str) -> None:
        """Under the lock, holding the turn: a callback for ``what`` runs next, so the holder
        made progress (a waiter times the holder from here) and says what it runs."""
        view = state.words.view
        view[H.SERVED_SINCE] = time.monotonic_ns()
        view[entry_at(state.slots, self.mine()) + Q.WHAT] = WHAT.index(what)

    def leave(self, state: State) -> int | None:
        """Under the lock: this thread is done with its ticket; the ticket to :meth:`wake`
        once the lock is released, if the turn moved to one."""
        ticket = self._tickets.pop(threads.get_ident(), 0)
        return leave(state, ticket) if ticket else None

    def leave_alone(self, timeout: float) -> None:
        """This thread is done with its ticket, if it has one, outside any lock hold of its
        own (a wait given up, an error unwinding)."""
        ticket = self.mine()
        if not ticket:
            return
        try:
            with self.section("turn", max(timeout, 1.0)) as state:
                moved = self.leave(state)
        except LockTimeout:
            # One store without the lock: the entry no longer names the ticket, so whoever
            # waits passes the turn on from it once the lock can be had. (Not passed over,
            # the entry is this ticket's: an entry is reused only for a ticket served.)
            self._tickets.pop(threads.get_ident(), None)
            at = self._entry(ticket)
            if (self.file.intact() and self._view[H.SERVING] <= ticket
                    and self._view[at + Q.TICKET] == ticket):
                self._view[at + Q.TICKET] = 0
            return
        self.wake(moved)

    def wait(self, what: str, timeout: float, cancel: Callable[[], bool] | None = None) -> None:
        """Until this thread's ticket is served (a ticket passed over asks again, at the
        back). TurnTimeout when the holder made no progress for ``timeout`` seconds,
        Cancelled as soon as ``cancel()`` is true; the ticket is left to the caller."""
        view, limit = self._view, int(timeout * 1e9)
        while True:
            self.file.verify()  # before the mapping is touched (StateDamaged)
            serving, ticket = view[H.SERVING], self.mine()
            if serving == ticket:
                return
            if serving > ticket:  # passed over while this process was stopped: to the back
                self.leave_alone(timeout)
                self._ask_alone(what, timeout)
                continue
            if cancel is not None and cancel():
                raise Cancelled(what)
            since, holder = view[H.SERVED_SINCE], self._holder(serving)
            if view[H.SERVING] != serving:
                continue
            if self._unfit(holder) and self._pass_over(serving, timeout):
                continue
            now = time.monotonic_ns()
            if now - since > limit and self._frozen(serving, timeout):
                raise TurnTimeout(f"gave up on the turn for {what} in pid {self.pid} after "
                                  f"{timeout:.1f}s: {self.holder_name()} has made no progress "
                                  f"for {(now - since) / 1e9:.1f}s", serving)
            deadline = min(now + int(CHECK * 1e9), since + limit + 1) / 1e9
            self._wake_on().wait(serving, ticket % 32, deadline)

    def wake(self, ticket: int | None) -> None:
        """Wake the waiter of ``ticket``, to which the turn moved (nothing for None)."""
        if ticket is not None and self.file.intact() and ticket < self._view[H.NEXT_TICKET]:
            self._wake_on().wake(ticket % 32)

    def _unfit(self, holder: tuple[int, int] | None) -> bool:
        """Whether the holder may have to be passed over, judged without the lock (which
        confirms it): its entry gone, its process dead, or stopped with a slot a sweep found
        lost. A stopped holder costs its waiters one read of /proc and of three columns."""
        if holder is None:
            return True
        now = condition(*holder)
        if now != "stopped":
            return now == "gone"
        view = self._view
        return any((view[at + S.PID], view[at + S.STARTED], view[at + S.STATE]) == (
            *holder, SlotState.LOST) for at in range(SLOTS_AT, SLOTS_AT + self.file.slots *
                                                    SLOT_WORDS, SLOT_WORDS))

    def _frozen(self, serving: int, timeout: float) -> bool:
        """Under the lock, before a waiter gives up: whether ``serving`` still holds the turn
        and has held it past ``timeout`` (what was read without the lock may be stale)."""
        try:
            with self.section("turn", timeout) as state:
                view = state.words.view
                return bool(view[H.SERVING] == serving and time.monotonic_ns()
                            - view[H.SERVED_SINCE] > timeout * 1e9)
        except LockTimeout:
            return True

    def _ask_alone(self, what: str, timeout: float) -> None:
        try:
            with self.section("turn", timeout) as state:
                self.ask(state, what, timeout)
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
    """A new ticket for the thread of ``pid``, the header's NEXT_TICKET; TurnTimeout, without
    one, if the holder is frozen (no progress for longer than ``timeout``)."""
    view, size = state.words.view, queue_size(state.slots)
    serving, ticket = view[H.SERVING], view[H.NEXT_TICKET]
    now = time.monotonic_ns()
    if serving < ticket and can_hold(state, serving) and now - view[H.SERVED_SINCE] > timeout * 1e9:
        raise TurnTimeout(f"gave up on the turn for {WHAT[what]} in pid {pid} at once: "
                          f"{named(view, entry_at(state.slots, serving))} has made no "
                          f"progress for {(now - view[H.SERVED_SINCE]) / 1e9:.1f}s (more than "
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
    if view[H.SERVING] == ticket < view[H.NEXT_TICKET]:  # issued, and holding: hand it over
        return advance(state, ticket)
    return None


def pass_over(state: State, serving: int) -> int | None:
    """If ``serving`` still holds the turn but cannot (see the module's docstring), move the
    turn on; the ticket it moved to."""
    view = state.words.view
    if view[H.SERVING] != serving or can_hold(state, serving):
        return None
    at = entry_at(state.slots, serving)
    if view[at + Q.TICKET] == serving and condition(view[at + Q.PID],
                                                     view[at + Q.STARTED]) != "gone":
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
    now = condition(pid, started) if view[at + Q.TICKET] == ticket else "gone"
    return now == "running" or (now == "stopped" and not any(
        (s.pid, s.started) == (pid, started) for s in state.slots_in(SlotState.LOST)))


def reset(state: State) -> None:
    """Nobody holds or waits (a new boot: every process of the old one is gone)."""
    view, queue = state.words.view, queue_at(state.slots)
    for index in range(queue_size(state.slots)):
        view[queue + index * QUEUE_WORDS + Q.TICKET] = 0
    view[H.SERVING] = view[H.NEXT_TICKET]


def named(view: memoryview, at: int) -> str:
    """The thread of the entry at ``at``, as it named itself: its pid and what it runs."""
    what = view[at + Q.WHAT]
    return f"pid {view[at + Q.PID]} ({WHAT[what] if 0 <= what < len(WHAT) else '?'})"
