"""One leader worker per state file: its election, its term, and its events (SPEC section 10).

The header's LEADER word holds the term and the leader's slot together, so that
a beat sees any change of leadership with one load; LEADER_TOKEN holds the
registration token of the leader's slot, so that a worker that registered again
(lost, then back) no longer leads under the old term.

The election is a rule kept at the end of every bookkeeping section
(:func:`keep`): whatever a section did (a loss, a release, a boot, or a section
cut short by a kill, repaired by the next), it ends with a leader that can lead,
or none when no worker can. A leader is never deposed while it can lead; a new
one is elected only once the old one is gone, lost or has withdrawn, and only
the process holding the named slot and token delivers ``leader_start`` for that
term. Callbacks take the node-wide turn, so a successor's ``leader_start`` also
runs only after its predecessor's ``leader_stop`` has returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress
from typing import TYPE_CHECKING, Any

from . import threads
from .events import Event
from .layout import (
    TERMS,
    Flag,
    GenerationState,
    H,
    Readiness,
    S,
    SlotState,
    index_of,
    leader_word,
    slot_at,
    term_of,
)
from .lifecycle import event_of
from .options import Options
from .state import Generation, State

if TYPE_CHECKING:
    from .transaction import Transactions


def leader_index(state: State) -> int | None:
    """The slot the LEADER word names, if its worker can lead: registered, booted, with the
    token it was elected with (four loads; no record is read whole: this runs in every
    section)."""
    index = index_of(state.header(H.LEADER))
    if index is None or index >= state.slots:
        return None
    at, words = slot_at(index), state.words
    if (words[at + S.STATE] != SlotState.REGISTERED or not words[at + S.FLAGS] & Flag.BOOTED
            or words[at + S.OWNER] != state.header(H.LEADER_TOKEN)):
        return None
    return index


def keep(state: State) -> None:
    """Keep the leader while it can lead; else elect the best candidate, in a new term.

    Candidates are the booted workers of open generations whose heartbeat is
    fresh (a superseded generation's workers are all on their way out), the
    newest ready generation first, and within one the freshest beat (the
    sweeper that found the leader lost, if it is a candidate).
    """
    word = state.header(H.LEADER)
    if leader_index(state) is not None:
        return
    generations = {g.number: g for g in state.generations() if g.state == GenerationState.OPEN}
    best = _best(state, generations) if generations else None
    if best is None:
        if index_of(word) is not None:
            state.set_header(H.LEADER, leader_word(term_of(word), None))
        return
    previous = term_of(word)
    # A new state file (a reboot empties the runtime directory) starts from the wall clock in
    # milliseconds, not from 1: the terms an external system has seen keep growing.
    term = previous + 1 if 0 < previous < TERMS - 1 else max(1, time.time_ns() // 10**6 % TERMS)
    state.set_header(H.LEADER_TOKEN, state.words[slot_at(best) + S.OWNER])  # before the word
    state.set_header(H.LEADER, leader_word(term, best))  # that names it: see the module


def _best(state: State, generations: dict[int, Generation]) -> int | None:
    """The slot of the best candidate, judged from columns (no record is read whole: with no
    leader, every section of a node whose workers are still booting looks)."""
    kinds, flags = state.slot_column(S.STATE), state.slot_column(S.FLAGS)
    numbers, stamps = state.slot_column(S.GENERATION), state.slot_column(S.HEARTBEAT)
    best, best_key, now = None, (False, (0, 0), 0), time.monotonic_ns()
    for index in compress(range(len(kinds)), kinds):
        gen = generations.get(numbers[index])
        if (kinds[index] != SlotState.REGISTERED or not flags[index] & Flag.BOOTED or gen is None
                or now - stamps[index] > gen.overrun):
            continue
        key = (gen.ready != Readiness.NOT_YET, gen.lineage, stamps[index])
        if best is None or key > best_key:
            best, best_key = index, key
    return best


def withdraw(state: State, index: int) -> None:
    """The worker in slot ``index`` stops being a candidate (it exits): if it leads, another
    is elected at the end of this section."""
    slot = state.slot(index)
    if slot.booted:
        state.set_flags(index, slot.flags & ~Flag.BOOTED)


class Leadership:
    """One worker's own leadership: whether it leads, and in which term.

    ``follow`` acts on the LEADER word: ``leader_stop`` first if this worker
    led and the word no longer names it in its term, then ``leader_start`` if
    it names it in a term it has not started. ``seen`` is the word it last
    acted on: a beat that loads another asks for ``follow`` again.
    """

    def __init__(self, transactions: Transactions, generation: int, options: Options,
                 server: Any, worker: Any, serving: Callable[[], bool]) -> None:
        self.tx = transactions
        self.generation = generation
        self.options = options
        self.server = server
        self.worker = worker
        self.serving = serving  # False once the worker is on its way out: it declines to lead
        self.term = 0  # the term whose leader_start was delivered here, until its leader_stop
        self.seen = 0
        self.asked = False  # a follow is on its way
        self._guard = threads.allocate_lock()

    def follow(self, index: int | None, token: int) -> None:
        """Deliver what the LEADER word owes this worker, in slot ``index`` with ``token``."""
        with self._guard:
            try:
                self.tx.run("leader", lambda state: self.owed(state, index, token),
                            self.options.lock_timeout)
            finally:
                self.asked = False

    def owed(self, state: State, index: int | None, token: int) -> list[LeaderStarted
                                                                         | LeaderStopped]:
        """Under the lock: the ``leader_stop`` and ``leader_start`` the LEADER word owes now.

        A worker that no longer serves (Gunicorn stops it) withdraws: it is never
        elected again, and if it was, another is. ``seen`` moves on unless a start
        is owed: a start that does not get its turn is tried again at a later beat.
        """
        if index is not None and not self.serving():
            withdraw(state, index)
        keep(state)
        named = self.named(state, index, token)
        word = state.header(H.LEADER)
        owed: list[LeaderStarted | LeaderStopped] = []
        if self.term and not (named and term_of(word) == self.term):
            owed.append(LeaderStopped(self, index, token, "lost"))
        if named and term_of(word) != self.term:
            owed.append(LeaderStarted(self, index, token))
        else:
            self.seen = word
        return owed

    def stop(self, index: int | None, token: int) -> None:
        """Before the worker's exit: its ``leader_stop``, if it leads."""
        with self._guard:
            if self.term:
                self.tx.run("leader_stop", lambda state: [LeaderStopped(self, index, token,
                                                                        "exit")],
                            self.options.lock_timeout)

    def named(self, state: State, index: int | None, token: int) -> bool:
        """Whether the LEADER word names this worker, in slot ``index`` with ``token``."""
        return (index is not None and leader_index(state) == index
                and state.words[slot_at(index) + S.OWNER] == token)

    def event(self, state: State, reason: str, owed: LeaderStarted | LeaderStopped, tell: bool,
              term: int) -> Event | None:
        """The event of ``term``, with this worker's counts read now (None if not ``tell``)."""
        if not tell:
            return None
        gen, pid = state.generation(self.generation), self.tx.pid
        if gen is None:  # its generation closed while it was stopped: no counts to give
            return Event(f"{self.generation}-{pid}", None, 0, None, reason, self.generation,
                         pid, self.server, self.worker, term)
        return event_of(state, gen, f"{gen.number}-{pid}", pid, reason, owed, tell, term)


@dataclass(frozen=True, slots=True)
class _Owed:
    leadership: Leadership
    index: int | None
    token: int

    @property
    def options(self) -> Options:
        return self.leadership.options

    @property
    def server(self) -> Any:
        return self.leadership.server

    @property
    def worker(self) -> Any:
        return self.leadership.worker

    def leads(self, state: State, term: int) -> bool:
        """Whether the LEADER word names this worker in ``term``."""
        return (self.leadership.named(state, self.index, self.token)
                and term_of(state.header(H.LEADER)) == term)


@dataclass(frozen=True, slots=True)
class LeaderStarted(_Owed):
    callback: str = "leader_start"

    def take(self, state: State, tell: bool = True) -> Event | None:
        mine, word = self.leadership, state.header(H.LEADER)
        mine.seen = word
        if term_of(word) == mine.term or not self.leads(state, term_of(word)):
            return None
        mine.term = term_of(word)
        return mine.event(state, "elected", self, tell, mine.term)


@dataclass(frozen=True, slots=True)
class LeaderStopped(_Owed):
    """``reason``: "exit" (before its worker_exit), or "lost" (another term, or none)."""

    reason: str = "lost"
    callback: str = "leader_stop"

    def take(self, state: State, tell: bool = True) -> Event | None:
        mine, term = self.leadership, self.leadership.term
        if not term or (self.reason == "lost" and self.leads(state, term)):
            return None  # not leading, or leading still (another thread stopped and restarted)
        mine.term = 0
        return mine.event(state, self.reason, self, tell, term)
