"""The lifecycle rules: lineage, counts, reasons, closures, and the events they owe.

Everything here runs under the state lock, on a :class:`~.state.State`. A change
that owes the user an event (a worker lost, a generation closed) is made at once
and returns an :class:`Owed`; its *delivery* (:mod:`transaction`) later takes the
event's effect on the counts and runs its callbacks, in turn. The counts every
callback sees are therefore those of the events delivered before it:

- a worker counts from the delivery of its ``worker_start`` to that of its
  ``worker_exit`` or ``worker_lost`` (the slot's COUNTED flag);
- a generation is announced from its ``master_start`` to its ``master_exit``,
  and counts in ``n_prev``/``n_next`` while announced or while workers of it
  still count (the orphans of a master that died).

Whoever delivers an owed event first takes its effect (under the lock), so an
event found twice is still delivered once, and anyone may finish a delivery
that the process which found it never made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress
from typing import Any, Protocol

from .events import Event
from .layout import Flag, GenerationState, H, Readiness, Reason, S, SlotState, slot_at
from .liveness import Here
from .options import Options
from .state import Generation, Slot, State
from .systemd import Moment


class Owed(Protocol):
    """An event the state owes; ``take`` makes its effect and returns it, if still owed
    (and ``tell``: a callback will be told)."""

    @property
    def callback(self) -> str: ...
    @property
    def options(self) -> Options: ...
    @property
    def server(self) -> Any: ...

    def take(self, state: State, tell: bool = True) -> Event | None: ...


@dataclass(frozen=True, slots=True)
class MasterStarted:
    number: int
    reason: Reason
    options: Options
    server: Any
    callback: str = "master_start"

    def take(self, state: State, tell: bool = True) -> Event | None:
        gen = state.generation(self.number)
        if gen is None or not gen.serving or gen.announced:
            return None
        state.set_generation(gen.index, announced=1)
        return event_of(state, gen, str(gen.number), gen.master_pid, self.reason, self, tell)


@dataclass(frozen=True, slots=True)
class MasterExited:
    number: int
    options: Options
    server: Any
    callback: str = "master_exit"

    def take(self, state: State, tell: bool = True) -> Event | None:
        gen = state.generation(self.number)
        if gen is None or gen.state != GenerationState.CLOSED or not gen.announced:
            return None
        event = event_of(state, gen, str(gen.number), gen.master_pid, gen.closed, self, tell)
        state.set_generation(gen.index, announced=0)
        retire_if_unused(state, gen.number)
        return event


@dataclass(frozen=True, slots=True)
class MasterReady:
    """``worker``: Gunicorn's object of the worker whose boot made the generation ready."""

    number: int
    options: Options
    server: Any
    worker: Any = None
    callback: str = "master_ready"

    def take(self, state: State, tell: bool = True) -> Event | None:
        gen = state.generation(self.number)
        if gen is None or gen.ready != Readiness.READY:
            return None
        state.set_generation(gen.index, ready=Readiness.TOLD)
        if not (gen.serving and gen.announced):  # nobody saw it start: nobody hears it ready
            return None
        return event_of(state, gen, str(gen.number), gen.master_pid, gen.opened, self, tell)


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """The start of the worker ``pid`` (started at ``started``), registered in slot ``index``
    (its token may change meanwhile: lost while it waits its turn, then back)."""

    index: int
    pid: int
    started: int
    resumed: bool
    options: Options
    server: Any
    worker: Any = None
    taken: Callable[[], None] | None = None  # told, under the lock, when it takes effect
    callback: str = "worker_start"

    def take(self, state: State, tell: bool = True) -> Event | None:
        slot = state.slot(self.index)
        gen = state.generation(slot.generation)
        if ((slot.pid, slot.started) != (self.pid, self.started)
                or slot.state != SlotState.REGISTERED or slot.counted or gen is None):
            return None
        state.set_flags(self.index, slot.flags | Flag.COUNTED)
        if self.taken is not None:
            self.taken()
        reason = "resume" if self.resumed else "respawn" if gen.gone else "spawn"
        return event_of(state, gen, f"{gen.number}-{slot.pid}", slot.pid, reason, self, tell)


@dataclass(frozen=True, slots=True)
class WorkerExited:
    index: int
    token: int
    options: Options
    server: Any
    worker: Any = None
    callback: str = "worker_exit"

    def take(self, state: State, tell: bool = True) -> Event | None:
        slot = state.slot(self.index)
        gen = state.generation(slot.generation)
        if slot.owner != self.token or not slot.counted or gen is None:
            return None
        event = event_of(state, gen, f"{gen.number}-{slot.pid}", slot.pid, "exit", self, tell)
        state.set_flags(self.index, slot.flags & ~Flag.COUNTED)
        return event


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """``dead``: the finder knows the process is gone (reaped, or judged dead), so its slot
    is freed once the loss is told; a worker lost by heartbeat may still come back."""

    index: int
    pid: int
    started: int
    dead: bool
    options: Options
    server: Any
    worker: Any = None
    callback: str = "worker_lost"

    def take(self, state: State, tell: bool = True) -> Event | None:
        slot = state.slot(self.index)
        gen = state.generation(slot.generation)
        if slot.state != SlotState.LOST or (slot.pid, slot.started) != (self.pid, self.started):
            return None
        event = None
        if slot.counted and gen is not None:
            state.set_flags(self.index, slot.flags & ~Flag.COUNTED)
            event = event_of(state, gen, f"{gen.number}-{slot.pid}", slot.pid, slot.reason, self,
                           tell)
        if self.dead:
            state.release(self.index)
            retire_if_unused(state, slot.generation)
        return event


def event_of(state: State, gen: Generation, event_id: str, pid: int, reason: Reason | str,
             owed: Owed, tell: bool, term: int | None = None) -> Event | None:
    """The event, counts read now; None when nobody is told (no callback): counts cost."""
    if not tell:
        return None
    n_prev, n_mine, n_next = counts(state, gen)
    text = reason.text if isinstance(reason, Reason) else reason
    return Event(event_id, n_prev, n_mine, n_next, text, gen.number, pid,
                 owed.server, getattr(owed, "worker", None), term)


def counts(state: State, mine: Generation) -> tuple[int | None, int, int | None]:
    """Counted workers of the nearest present generation before ``mine``, of it, and after."""
    counted = state.counted()
    present = [g for g in state.generations() if g.announced or counted[g.number]]
    older = [g for g in present if g.lineage < mine.lineage]
    newer = [g for g in present if g.lineage > mine.lineage]
    return (
        counted[max(older, key=lambda g: g.lineage).number] if older else None,
        counted[mine.number],
        counted[min(newer, key=lambda g: g.lineage).number] if newer else None,
    )


def lose(state: State, slot: Slot, reason: Reason, dead: bool, options: Options, server: Any,
         worker: Any = None) -> list[Owed]:
    """A registered worker is gone without a word (or too late): it is lost for ``reason``."""
    state.lose(slot.index, reason, time.monotonic_ns())
    state.tally(H.LOST_TALLY, reason)
    count_gone(state, slot.generation)
    return [WorkerLost(slot.index, slot.pid, slot.started, dead, options, server, worker)]


def count_gone(state: State, number: int, change: int = 1) -> None:
    """One more worker of generation ``number`` exited or was lost (for "respawn"), or one
    less: a loss that never happened."""
    gen = state.generation(number)
    if gen is not None:
        state.set_generation(gen.index, gone=max(0, gen.gone + change))


def exit_reason(state: State, gen: Generation, here: Here, master_alive: bool) -> Reason:
    """Why ``gen`` closes, by lineage: a newer live master, a live USR2 parent, or neither."""
    if gen.state == GenerationState.SUPERSEDED and master_alive:
        return Reason.RELOAD
    others = [g for g in state.generations() if g.serving and g.master_pid != gen.master_pid
              and here.master_alive(g)]
    if master_alive and any(g.lineage > gen.lineage for g in others):
        return Reason.UPGRADE
    if gen.parent_pid and any((g.master_pid, g.master_started) == (gen.parent_pid,
                                                                    gen.parent_started)
                              for g in others):
        return Reason.ROLLBACK
    return Reason.STOP if master_alive else Reason.CRASH


def close(state: State, gen: Generation, reason: Reason, options: Options, server: Any
          ) -> list[Owed]:
    """Close ``gen``: the losses of it still owed, then its master_exit."""
    state.set_generation(gen.index, closed=reason, closed_at=time.monotonic_ns(),
                         state=GenerationState.CLOSED)
    state.tally(H.CLOSED_TALLY, reason)
    if not gen.announced:
        retire_if_unused(state, gen.number)  # its master_start was never delivered: no exit
    return owed_by(state, gen, options, server)


def owed_by(state: State, gen: Generation, options: Options, server: Any) -> list[Owed]:
    """What a closed generation still owes: the losses of its workers, then its master_exit."""
    owed: list[Owed] = [WorkerLost(s.index, s.pid, s.started, False, options, server)
                        for s in state.slots_in(SlotState.LOST)
                        if s.generation == gen.number and s.counted]
    return [*owed, MasterExited(gen.number, options, server)]


def close_dead(state: State, gen: Generation, here: Here, options: Options, server: Any
               ) -> list[Owed]:
    """Close a generation whose master died without ``on_exit``: "rollback" or "crash".

    Its workers still alive are orphans finishing their requests: they keep
    counting, and keep their own exit; the dead ones are lost.
    """
    owed: list[Owed] = []
    for slot in state.slots_in(SlotState.REGISTERED):
        if slot.generation == gen.number and here.alive(slot.pid, slot.started, gen.pidns) is False:
            owed += lose(state, slot, Reason.CRASH, True, options, server)
    reason = exit_reason(state, gen, here, master_alive=False)
    if reason == Reason.ROLLBACK:
        state.mark(Moment.ROLLED_BACK, gen)  # systemd follows the old master again
    state.note("gunicorn_lifecycle: master %s died without on_exit; its generation %s closes "
               "(%s)", gen.master_pid, gen.number, reason.text)
    if reason == Reason.CRASH and not any(
        g.serving and g.number != gen.number and here.master_alive(g)
        for g in state.generations()
    ):
        state.set_header(H.RESTART_DUE, 1)
    return owed + close(state, gen, reason, options, server)


def booted(state: State, number: int) -> int:
    """Registered workers of generation ``number`` that finished booting."""
    return sum(1 for gen, st, flags in zip(state.slot_column(S.GENERATION),
                                           state.slot_column(S.STATE),
                                           state.slot_column(S.FLAGS), strict=True)
               if gen == number and st == SlotState.REGISTERED and flags & Flag.BOOTED)


def ready_if_complete(state: State, number: int, options: Options, server: Any,
                      worker: Any = None) -> list[Owed]:
    """Mark an open generation ready the first time its booted workers reach its target.

    Its master_ready is owed from then on; whoever made the change delivers it.
    """
    gen = state.generation(number)
    if gen is None or gen.state != GenerationState.OPEN or gen.ready != Readiness.NOT_YET:
        return []
    if not 0 < gen.target <= booted(state, number):
        return []
    state.set_generation(gen.index, ready=Readiness.READY, ready_at=time.monotonic_ns())
    state.mark(Moment.READY, gen)
    return [MasterReady(number, options, server, worker)]


def retire_if_unused(state: State, number: int) -> None:
    """Free a closed, unannounced generation record once no slot refers to it."""
    gen = state.generation(number)
    if gen is None or gen.state != GenerationState.CLOSED or gen.announced:
        return
    if not any(s.generation == number
               for s in state.slots_in(SlotState.REGISTERED, SlotState.LOST)):
        state.set_generation(gen.index, state=GenerationState.FREE)


def free_slot(state: State, here: Here) -> int | None:
    """A slot to register into: a free one, else one whose reported loss is final."""
    states = state.slot_column(S.STATE)
    if SlotState.FREE in states:
        return states.index(SlotState.FREE)
    generations = {g.number: g for g in state.generations()}
    for slot in state.slots_in(SlotState.LOST):
        if lost_for_good(slot, generations.get(slot.generation), here):
            return slot.index
    return None


def lost_for_good(slot: Slot, gen: Generation | None, here: Here) -> bool:
    """A reported loss that nothing can undo: the worker is dead, or its generation closed
    (a worker that comes back finds no generation to come back to)."""
    return not slot.counted and (gen is None or gen.state == GenerationState.CLOSED
                                 or here.alive(slot.pid, slot.started, gen.pidns) is False)


def sweep(state: State, here: Here, options: Options, server: Any) -> list[Owed]:
    """Find what died without a word, once per interval node-wide; the events it owes.

    Masters that died close their generations ("crash", "rollback"); registered
    workers whose heartbeat overran are lost ("heartbeat"); orphans that died are
    lost ("crash"); events owed for longer than an overrun (their finder died or
    is stuck) are owed again, to whoever delivers first; records nobody needs
    any more are freed. A registered worker of a serving generation whose stamp
    is fresh, the common case, is judged from three columns, not read whole.
    """
    owed: list[Owed] = []
    records = state.generations()  # read once (again only after a close): records cost
    dead = [g for g in records if g.serving and not here.master_alive(g)]
    for gen in dead:
        owed += close_dead(state, gen, here, options, server)
    generations = {g.number: g for g in (state.generations() if dead else records)}
    newest = max((g for g in generations.values() if g.serving), key=lambda g: g.lineage,
                 default=None)
    newest_workers = 0  # registered workers of the newest generation, fresh after the sweep
    kinds, numbers, stamps = (state.slot_column(S.STATE), state.slot_column(S.GENERATION),
                              state.slot_column(S.HEARTBEAT))
    overruns = {g.number: g.overrun for g in generations.values() if g.serving}
    newest_number = newest.number if newest is not None else 0
    registered, now = SlotState.REGISTERED, time.monotonic_ns()
    for index in compress(range(len(kinds)), kinds):  # the slots in use, found in C
        kind, number, overrun = kinds[index], numbers[index], overruns.get(numbers[index])
        if kind == registered and overrun is not None and now - stamps[index] <= overrun:
            newest_workers += number == newest_number
            continue
        of = generations.get(number)
        if of is None:
            continue
        slot = state.slot(index)
        if slot.state == SlotState.REGISTERED:
            if _overran(state, index, stamps[index], of.overrun):
                owed += lose(state, slot, Reason.HEARTBEAT, False, options, server)
            elif of.state == GenerationState.CLOSED and here.alive(
                    slot.pid, slot.started, of.pidns) is False:
                owed += lose(state, slot, Reason.CRASH, True, options, server)
            else:
                newest_workers += number == newest_number
        elif slot.counted:
            if time.monotonic_ns() - slot.heartbeat > of.overrun:  # lost that long ago
                owed.append(WorkerLost(index, slot.pid, slot.started, False, options, server))
        elif lost_for_good(slot, of, here):
            state.release(index)
    for gen in generations.values():  # as read before the losses, which change only GONE
        if gen.ready == Readiness.READY and time.monotonic_ns() - gen.ready_at > gen.overrun:
            owed.append(MasterReady(gen.number, options, server))  # its finder never told
        if gen.state != GenerationState.CLOSED:
            continue
        if not gen.announced:
            retire_if_unused(state, gen.number)
        elif time.monotonic_ns() - gen.closed_at > gen.overrun:
            owed += owed_by(state, gen, options, server)
    if newest is not None and newest_workers and newest not in dead:  # its master lives
        state.mark(Moment.ALIVE, newest)  # systemd's watchdog: every worker of it beats
    return owed


def _overran(state: State, index: int, stamp: int, overrun: int) -> bool:
    """Whether a stamp overran: checked again on a fresh clock read *before* a fresh load of
    the stamp, so that a sweeper delayed anywhere in between errs towards alive."""
    if time.monotonic_ns() - stamp <= overrun:
        return False
    now = time.monotonic_ns()
    return now - state.words.view[slot_at(index) + S.HEARTBEAT] > overrun
