"""The state file's binary layout: one header, a generation table, worker slots.

Everything is little-endian with explicit padding, so that the format is the
same for every Python build that maps it::

    header       64 bytes   magic, version, capacities, counters
    generations  48 bytes each (GENERATIONS of them)
    slots        48 bytes each (the capacity chosen when the file was made)

Each record starts with a sequence counter. A writer (always under the lock)
makes it odd, writes the record, and makes it even again; a reader without
the lock retries until it reads the same even counter before and after, so it
never sees a half-written record. The one field written without the lock is a
slot's heartbeat, a single aligned 64-bit word that only its own worker
writes.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from .errors import LifecycleError

MAGIC = b"GUNILIFE"
VERSION = 1
GENERATIONS = 16

# magic, version, generation count, slot capacity, (pad), next generation,
# last sweep (monotonic ns), lock holder pid, lock holder event code, boot id
# (monotonic times and process start times mean nothing after a reboot).
HEADER = struct.Struct("<8sIII4xqqiI16s")
HEADER_SIZE = 64
_NEXT_GENERATION = 24
_LAST_SWEEP = 32
_HOLDER = struct.Struct("<iI")
_HOLDER_AT = 40
_BOOT_ID = struct.Struct("<16s")
_BOOT_ID_AT = 48

# seq, state, reason, generation, master pid, its USR2 parent master's pid,
# master start time, workers gone, opened at (wall clock).
GENERATION = struct.Struct("<IBB2xqiiQI4xd")
# seq, state, booted, generation, pid, start time, heartbeat (monotonic ns),
# heartbeat overrun allowed (ns).
SLOT = struct.Struct("<IBB2xqi4xQqq")
_SEQ = struct.Struct("<I")
_HEARTBEAT = struct.Struct("<q")
_HEARTBEAT_AT = 32
# Lean views of a slot for the hot paths, which need a few fields of every slot
# (or of their own) and no record objects: state and generation (counts, free
# slots); seq, state, heartbeat and overrun (sweeps); state, pid, start (stamps).
_SLOT_USE = struct.Struct("<4xB3xq32x")
_SLOT_OWNER = struct.Struct("<4xB11xi4xQ")
_ODD = bytes(i & 1 for i in range(256))  # maps a counter's low byte to 1 when it is odd

# How long a lock-free reader waits for a record's writer, which a loaded machine
# may preempt in the middle of a write for milliseconds.
_READ_PATIENCE = 1.0


class GenerationState(enum.IntEnum):
    FREE = 0
    OPEN = 1
    SUPERSEDED = 2  # opened anew by HUP in the same master; closes with its last worker


class SlotState(enum.IntEnum):
    FREE = 0
    REGISTERED = 1


MASTER_REASONS = ("", "start", "restart", "reload", "upgrade")


class Header(NamedTuple):
    magic: bytes
    version: int
    generations: int
    slots: int
    next_generation: int
    last_sweep: int
    holder_pid: int
    holder_event: int
    boot_id: bytes


class Generation(NamedTuple):
    seq: int
    state: int
    reason: int
    generation: int
    master_pid: int
    parent_pid: int
    master_started: int
    gone: int
    opened_at: float

    @property
    def is_open(self) -> bool:
        return self.state != GenerationState.FREE


class Slot(NamedTuple):
    seq: int
    state: int
    booted: int
    generation: int
    pid: int
    started: int
    heartbeat: int
    overrun: int

    @property
    def registered(self) -> bool:
        return self.state == SlotState.REGISTERED


FREE_SLOT = Slot(0, SlotState.FREE, 0, 0, 0, 0, 0, 0)


def file_size(slots: int) -> int:
    """The exact size of a state file with ``slots`` worker slots."""
    return HEADER_SIZE + GENERATIONS * GENERATION.size + slots * SLOT.size


def new_file(slots: int) -> bytes:
    """The contents of a fresh state file: every record free."""
    header = HEADER.pack(MAGIC, VERSION, GENERATIONS, slots, 1, 0, 0, 0, b"")
    return header.ljust(HEADER_SIZE, b"\0").ljust(file_size(slots), b"\0")


def check_header(data: bytes | memoryview, size: int, path: str) -> Header:
    """Parse and validate the header of a file of ``size`` bytes; LifecycleError if not ours."""
    fix = f"move it away or give this instance another state_file; nothing was changed in {path}"
    if size < HEADER.size:
        raise LifecycleError(f"state file {path} is not a gunicorn_lifecycle state file "
                             f"(only {size} bytes): {fix}")
    header = Header(*HEADER.unpack_from(data, 0))
    if header.magic != MAGIC:
        raise LifecycleError(f"state file {path} is not a gunicorn_lifecycle state file "
                             f"(wrong magic number): {fix}")
    if header.version != VERSION:
        raise LifecycleError(f"state file {path} has format version {header.version}, "
                             f"this gunicorn_lifecycle reads version {VERSION}: {fix}")
    if header.generations != GENERATIONS or header.slots < 1:
        raise LifecycleError(f"state file {path} declares an impossible capacity "
                             f"({header.generations} generations, {header.slots} slots): {fix}")
    if size != file_size(header.slots):
        raise LifecycleError(f"state file {path} is {size} bytes, but its {header.slots} slots "
                             f"need {file_size(header.slots)}: {fix}")
    return header


class StateView:
    """Typed access to the records of a mapped, validated state file."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.path = path
        self.buf = buf
        self.header = check_header(buf, len(buf), path)
        self.slots = self.header.slots
        self._slots_at = HEADER_SIZE + GENERATIONS * GENERATION.size

    # header counters, written under the lock one aligned field at a time

    def next_generation(self) -> int:
        return int(struct.unpack_from("<q", self.buf, _NEXT_GENERATION)[0])

    def set_next_generation(self, value: int) -> None:
        struct.pack_into("<q", self.buf, _NEXT_GENERATION, value)

    def last_sweep(self) -> int:
        return int(struct.unpack_from("<q", self.buf, _LAST_SWEEP)[0])

    def set_last_sweep(self, ns: int) -> None:
        struct.pack_into("<q", self.buf, _LAST_SWEEP, ns)

    def boot_id(self) -> bytes:
        return bytes(_BOOT_ID.unpack_from(self.buf, _BOOT_ID_AT)[0])

    def set_boot_id(self, boot_id: bytes) -> None:
        _BOOT_ID.pack_into(self.buf, _BOOT_ID_AT, boot_id)

    def holder(self) -> tuple[int, int]:
        """The pid and event code of the last process that took the lock."""
        pid, event = _HOLDER.unpack_from(self.buf, _HOLDER_AT)
        return int(pid), int(event)

    def set_holder(self, pid: int, event: int) -> None:
        _HOLDER.pack_into(self.buf, _HOLDER_AT, pid, event)

    # records: lock holders read in one pass (no other writer races them but a
    # heartbeat word); lock-free readers read record by record, seq-checked.

    def locked_generations(self) -> Iterator[tuple[int, Generation]]:
        region = self.buf[HEADER_SIZE : self._slots_at]
        for index, fields in enumerate(GENERATION.iter_unpack(region)):
            yield index, Generation(*fields)

    def locked_slots(self) -> Iterator[tuple[int, Slot]]:
        for index, fields in enumerate(SLOT.iter_unpack(self._slot_region())):
            yield index, Slot(*fields)

    def locked_generation(self, index: int) -> Generation:
        return Generation(*GENERATION.unpack_from(self.buf, HEADER_SIZE + index * GENERATION.size))

    def locked_slot(self, index: int) -> Slot:
        return Slot(*SLOT.unpack_from(self.buf, self._slots_at + index * SLOT.size))

    def consistent_generation(self, index: int) -> Generation:
        return Generation(*self._read(GENERATION, HEADER_SIZE + index * GENERATION.size))

    def consistent_slot(self, index: int) -> Slot:
        return Slot(*self._read(SLOT, self._slots_at + index * SLOT.size))

    def write_generation(self, index: int, record: Generation) -> None:
        self._write(GENERATION, HEADER_SIZE + index * GENERATION.size, record)

    def write_slot(self, index: int, record: Slot) -> None:
        self._write(SLOT, self._slots_at + index * SLOT.size, record)

    def stamp(self, index: int, pid: int, started: int, ns: int) -> bool:
        """The lock-free beat: if the slot still holds this worker, write its heartbeat word.

        No sequence check: only a lock holder changes who a slot holds, and a
        torn read here errs either way harmlessly (a needless re-registration,
        which checks again under the lock, or a stamp on a slot just reused).
        """
        at = self._slots_at + index * SLOT.size
        if _SLOT_OWNER.unpack_from(self.buf, at) != (SlotState.REGISTERED, pid, started):
            return False
        _HEARTBEAT.pack_into(self.buf, at + _HEARTBEAT_AT, ns)
        return True

    def slot_uses(self) -> Iterator[tuple[int, int]]:
        """(state, generation) of every slot, for lock holders."""
        return _SLOT_USE.iter_unpack(self._slot_region())

    def sweep_candidates(self) -> list[int]:
        """The registered slots and the half-written ones: all that a sweep must read.

        Found with strided byte copies and ``bytes.find``, so that a sweep of a
        large, mostly free file costs little more than its registered slots.
        """
        region = self._slot_region()
        states = bytes(region[4 :: SLOT.size])
        torn = bytes(region[0 :: SLOT.size]).translate(_ODD)  # little-endian: low byte first
        return sorted({*_positions(states, SlotState.REGISTERED), *_positions(torn, 1)})

    def _slot_region(self) -> memoryview:
        return self.buf[self._slots_at : self._slots_at + self.slots * SLOT.size]

    def _read(self, layout: struct.Struct, at: int) -> tuple[Any, ...]:
        deadline = time.monotonic() + _READ_PATIENCE
        pause = 0.0001
        while True:
            (before,) = _SEQ.unpack_from(self.buf, at)
            fields = layout.unpack_from(self.buf, at)
            (after,) = _SEQ.unpack_from(self.buf, at)
            if before % 2 == 0 and after == before:
                return fields
            if time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        raise LifecycleError(f"state file {self.path}: the record at byte {at} stays half-written "
                             "(a writer died in the middle of it); the next lock holder repairs it")

    def _write(self, layout: struct.Struct, at: int, record: tuple[object, ...]) -> None:
        # Works from any counter, even one left odd by a writer that was killed mid-write.
        (seq,) = _SEQ.unpack_from(self.buf, at)
        odd = (seq + 1) | 1
        _SEQ.pack_into(self.buf, at, odd & 0xFFFFFFFF)
        layout.pack_into(self.buf, at, odd & 0xFFFFFFFF, *record[1:])
        _SEQ.pack_into(self.buf, at, (odd + 1) & 0xFFFFFFFF)


def _positions(data: bytes, value: int) -> Iterator[int]:
    at = data.find(value)
    while at >= 0:
        yield at
        at = data.find(value, at + 1)
