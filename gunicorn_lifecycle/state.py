"""The records of the state file, typed, and every change to them in a crash-safe order.

Records are named tuples, not dataclasses: the command line reads them too, and
a health probe should not pay dataclasses' import.

Reads and changes here are for lock holders (``read_*`` for lock-free readers).
Each change stores the word that commits it last (a slot's state, a
generation's state), so that a writer stopped half-way, by a kill or by an
exception from a signal handler, leaves a record that still means what it meant
before, or already what it was going to mean (see :mod:`protocol`).
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple, TypeVar, cast

from .errors import LifecycleError
from .layout import (
    GENERATION_WORDS,
    GENERATIONS,
    GENERATIONS_AT,
    REASON_SHIFT,
    SLOT_WORDS,
    SLOTS_AT,
    Flag,
    G,
    GenerationState,
    H,
    Readiness,
    Reason,
    S,
    SlotState,
    generation_at,
    slot_at,
)
from .protocol import Words

if TYPE_CHECKING:
    from .systemd import Moment

E = TypeVar("E", bound=enum.Enum)


class Generation(NamedTuple):
    index: int  # type: ignore[assignment]  # the record's place; tuple.index is not used
    number: int
    state: GenerationState
    opened: Reason
    closed: Reason
    announced: bool
    master_pid: int
    master_started: int
    pidns: int
    parent_pid: int
    parent_started: int
    depth: int
    gone: int
    opened_at: int
    overrun: int
    closed_at: int
    target: int
    ready: Readiness
    ready_at: int

    @property
    def serving(self) -> bool:
        """Its master has not closed it: open, or superseded and draining."""
        return self.state in (GenerationState.OPEN, GenerationState.SUPERSEDED)

    @property
    def lineage(self) -> tuple[int, int]:
        """Sort key of "before" and "after": a USR2 master's generations after its parent's."""
        return self.depth, self.number


class Slot(NamedTuple):
    index: int  # type: ignore[assignment]  # the slot's place; tuple.index is not used
    owner: int
    state: SlotState
    generation: int
    pid: int
    started: int
    heartbeat: int
    flags: int

    @property
    def booted(self) -> bool:
        return bool(self.flags & Flag.BOOTED)

    @property
    def counted(self) -> bool:
        return bool(self.flags & Flag.COUNTED)

    @property
    def reason(self) -> Reason:
        return Reason(self.flags >> REASON_SHIFT)


class State:
    """Typed access to the mapped, validated state file."""

    def __init__(self, words: Words) -> None:
        self.words = words
        self.path = words.path
        self.slots = words.slots
        self.notes: list[tuple[str, tuple[object, ...]]] = []
        self.moments: list[tuple[Moment, Generation]] = []
        self.counts_changed = False  # an event was taken in this section (systemd's STATUS)

    def note(self, message: str, *args: object) -> None:
        """A warning to log once the lock is released: a slow log never holds the lock."""
        self.notes.append((message, args))

    def mark(self, moment: Moment, gen: Generation) -> None:
        """A moment of ``gen`` to tell systemd once the lock is released (:mod:`systemd`)."""
        self.moments.append((moment, gen))

    # header

    def take_generation_number(self) -> int:
        number = self.words[H.NEXT_GENERATION]
        self.words[H.NEXT_GENERATION] = number + 1
        return number

    def take_token(self) -> int:
        token = self.words[H.NEXT_TOKEN]
        self.words[H.NEXT_TOKEN] = token + 1 if token + 1 < 2**62 else 1
        return token

    def header(self, word: int) -> int:
        return self.words[word]

    def set_header(self, word: int, value: int) -> None:
        self.words[word] = value

    def tally(self, table: H, reason: Reason, change: int = 1) -> None:
        """Count one more generation opened or closed, or worker lost, for ``reason`` (or one
        less: a loss that never happened)."""
        self.words[table + reason] += change

    # generations

    def generations(self) -> list[Generation]:
        """Every generation record in use, validated."""
        found = []
        states = self.words.column(GENERATIONS_AT + G.STATE, GENERATION_WORDS, GENERATIONS)
        for index, state in enumerate(states):
            if state != GenerationState.FREE:
                found.append(self.generation_record(index))
        return found

    def generation(self, number: int) -> Generation | None:
        for record in self.generations():
            if record.number == number:
                return record
        return None

    def generation_record(self, index: int) -> Generation:
        at = generation_at(index)
        return decode_generation(index, self.words.view[at : at + GENERATION_WORDS].tolist(),
                                 self.path)

    def newest_serving(self) -> Generation | None:
        """The newest generation by lineage that its master has not closed."""
        serving = [g for g in self.generations() if g.serving]
        return max(serving, key=lambda g: g.lineage) if serving else None

    def free_generation_index(self) -> int | None:
        states = self.words.column(GENERATIONS_AT + G.STATE, GENERATION_WORDS, GENERATIONS)
        return states.index(GenerationState.FREE) if GenerationState.FREE in states else None

    def open_generation(self, index: int, **fields: int) -> None:
        """Fill a free record, then open it (the state word commits)."""
        self.words.change(generation_at(index), [
            *((G[name.upper()], value) for name, value in fields.items()),
            (G.STATE, GenerationState.OPEN)])

    def set_generation(self, index: int, **fields: int) -> None:
        """Change some words of a record; ``state``, if given, is stored last."""
        changes = [(G[name.upper()], value) for name, value in fields.items() if name != "state"]
        if "state" in fields:
            changes.append((G.STATE, fields["state"]))
        self.words.change(generation_at(index), changes)

    # slots

    def slot(self, index: int) -> Slot:
        at = slot_at(index)
        return decode_slot(index, self.words.view[at : at + SLOT_WORDS].tolist(), self.path)

    def slot_column(self, word: S) -> list[int]:
        return self.words.column(SLOTS_AT + word, SLOT_WORDS, self.slots)

    def slots_in(self, *states: SlotState) -> list[Slot]:
        """The slots in any of ``states`` (all of them read only for those)."""
        column = self.slot_column(S.STATE)
        return [self.slot(i) for i, state in enumerate(column) if state in states]

    def counted(self) -> Counter[int]:
        """Generation number -> its workers whose start was delivered and end was not."""
        flags, generations = self.slot_column(S.FLAGS), self.slot_column(S.GENERATION)
        return Counter(g for f, g in zip(flags, generations, strict=True) if f & Flag.COUNTED)

    def register(self, index: int, token: int, generation: int, pid: int, started: int,
                 heartbeat: int, flags: int) -> None:
        """Fill a slot, then commit it REGISTERED to ``token``."""
        self.words.change(slot_at(index), [
            (S.STATE, SlotState.FREE), (S.GENERATION, generation), (S.PID, pid),
            (S.STARTED, started), (S.HEARTBEAT, heartbeat), (S.FLAGS, flags), (S.OWNER, token),
            (S.STATE, SlotState.REGISTERED)])

    def lose(self, index: int, reason: Reason, now: int) -> None:
        """Take the slot from its owner (its next beat sees it), LOST for ``reason`` at ``now``."""
        flags = self.slot(index).flags & 0xFF
        self.words.change(slot_at(index), [
            (S.OWNER, 0), (S.FLAGS, flags | reason << REASON_SHIFT), (S.HEARTBEAT, now),
            (S.STATE, SlotState.LOST)])

    def reclaim(self, index: int, token: int, heartbeat: int) -> None:
        """Give a lost slot back to its worker, alive after all, under a new ``token``."""
        flags = self.slot(index).flags & 0xFF
        self.words.change(slot_at(index), [
            (S.FLAGS, flags), (S.HEARTBEAT, heartbeat), (S.OWNER, token),
            (S.STATE, SlotState.REGISTERED)])

    def release(self, index: int) -> None:
        """Free the slot (the state word commits first: a FREE slot means nothing else)."""
        self.words.change(slot_at(index), [(S.OWNER, 0), (S.STATE, SlotState.FREE),
                                           (S.FLAGS, 0)])

    def set_flags(self, index: int, flags: int) -> None:
        self.words.change(slot_at(index), [(S.FLAGS, flags)])


def decode_generation(index: int, words: list[int], path: str) -> Generation:
    """A generation record from its words; LifecycleError naming the file if they are not one."""
    try:
        record = Generation(
            index, words[G.NUMBER], _member(GenerationState, words[G.STATE]),
            _member(Reason, words[G.OPENED]), _member(Reason, words[G.CLOSED]),
            _bit(words[G.ANNOUNCED]), words[G.MASTER_PID], words[G.MASTER_STARTED],
            words[G.PIDNS], words[G.PARENT_PID], words[G.PARENT_STARTED], words[G.DEPTH],
            words[G.GONE], words[G.OPENED_AT], words[G.OVERRUN], words[G.CLOSED_AT],
            words[G.TARGET], _member(Readiness, words[G.READY]), words[G.READY_AT])
    except ValueError:
        raise _corrupt(path, f"generation record {index}") from None
    if record.state != GenerationState.FREE and (
        record.number < 1 or record.master_pid < 1 or record.opened == Reason.NONE
        or record.depth < 0 or record.overrun < 0 or record.target < 0
    ):
        raise _corrupt(path, f"generation record {index}")
    return record


def decode_slot(index: int, words: list[int], path: str) -> Slot:
    """A slot from its words; LifecycleError naming the file if they are not one."""
    try:
        record = Slot(index, words[S.OWNER], _member(SlotState, words[S.STATE]),
                      words[S.GENERATION], words[S.PID], words[S.STARTED], words[S.HEARTBEAT],
                      words[S.FLAGS])
        _member(Reason, record.flags >> REASON_SHIFT)
    except ValueError:
        raise _corrupt(path, f"worker slot {index}") from None
    # A registration cut short may leave a FREE slot with an owner, a loss cut short a
    # REGISTERED one without: both are prefixes of a change. A LOST slot never has one.
    if record.flags < 0 or record.flags & 0xFF & ~(Flag.BOOTED | Flag.COUNTED) or (
        record.state != SlotState.FREE and (record.pid < 1 or record.generation < 1)
    ) or (record.state == SlotState.LOST and record.owner != 0):
        raise _corrupt(path, f"worker slot {index}")
    return record


def _member(kind: type[E], value: int) -> E:
    """``kind(value)``, by one lookup (a call of an enum class is slow, and sweeps decode
    records); ValueError for a value that is not one."""
    try:
        return cast(E, kind._value2member_map_[value])
    except (KeyError, TypeError):
        raise ValueError(value) from None


def _bit(value: int) -> bool:
    if value not in (0, 1):
        raise ValueError(value)
    return bool(value)


def _corrupt(path: str, what: str) -> LifecycleError:
    return LifecycleError(f"state file {path}: {what} is corrupt (overwritten by something other "
                          "than gunicorn_lifecycle); stop the servers that use it and remove it")
