"""The concurrency protocol: atomic words and guarded records over the mapped file.

Three rules make every read of the shared mapping safe:

- **One word, one access.** The file is used only through ``memoryview.cast("q")``,
  whose item access copies an aligned 8-byte word with one load or one store.
  (``struct.pack_into`` clears a field before it writes it, byte by byte: a
  concurrent reader can see zero where a stamp was.) The words read without the
  lock, a slot's owner and heartbeat and the header's sweep deadline, are each
  written whole, by one store.
- **Guarded records.** Records change only under the lock, one change at a time:
  the header's ``DIRTY`` word names the record, its sequence word turns odd, the
  changed words are stored, the sequence turns even, ``DIRTY`` is cleared. A
  reader without the lock copies a record between two equal, even sequence
  words; one that cannot within its patience calls the record unknown.
- **Repair at once.** A writer killed in the middle of a change (or cut short by
  an exception from a signal handler) leaves ``DIRTY`` set: the next lock holder
  makes that record's sequence even again. What it holds then is a prefix of
  the change, and :mod:`state` orders every change so that each prefix means
  something (the word that commits it is stored last).

The ordering these rules need holds on x86-64 (stores are seen in program
order); on weakly ordered CPUs the lock's system calls order the writers, and
only the lock-free reader of whole records (``status``) could see a mixed copy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from . import threads
from .errors import LifecycleError
from .layout import GENERATION_WORDS, GENERATIONS_AT, SLOT_WORDS, SLOTS_AT, H

# How long a lock-free reader waits for a record's writer, which a loaded machine may
# preempt in the middle of a change for milliseconds.
READ_PATIENCE = 1.0
_SPINS = 100


class Words:
    """The mapped state file as aligned signed 64-bit words."""

    def __init__(self, buf: memoryview, slots: int, path: str) -> None:
        # The mapping starts on a page boundary, so every word is aligned. Hot paths index
        # ``view`` directly; item access on it is the one load or store of the rules above.
        self.view = buf.cast("q")
        self.slots = slots
        self.path = path

    def __getitem__(self, index: int) -> int:
        return int(self.view[index])

    def __setitem__(self, index: int, value: int) -> None:
        self.view[index] = value

    def column(self, first: int, stride: int, count: int) -> list[int]:
        """Every ``stride``-th word from ``first``, ``count`` of them: one field of each record."""
        return self.view[first : first + stride * count : stride].tolist()

    def change(self, at: int, changes: Iterable[tuple[int, int]]) -> None:
        """Store ``changes`` (offset, value) into the record at ``at``, in order; under the lock."""
        view = self.view
        view[H.DIRTY] = at
        odd = view[at] | 1  # from an even sequence, or one a dead writer left odd
        view[at] = odd
        for offset, value in changes:
            view[at + offset] = value
        view[at] = odd + 1
        view[H.DIRTY] = 0

    def repair(self) -> None:
        """Finish what a writer that died in the middle of a change left; under the lock."""
        at = self.view[H.DIRTY]
        if not at:
            return
        if not self._is_record(at):
            raise LifecycleError(f"state file {self.path}: its header names word {at} as being "
                                 "written, which starts no record: the file was overwritten")
        if self.view[at] & 1:
            self.view[at] += 1
        self.view[H.DIRTY] = 0

    def read(self, at: int, count: int, patience: float = READ_PATIENCE) -> list[int] | None:
        """A consistent copy of the ``count`` words of the record at ``at``, without the lock.

        None when no copy was consistent within ``patience`` seconds: the record
        is unknown (being written, or left half-written by a writer that died).
        A change takes microseconds: the first retries come at once, later ones
        after a growing sleep (the writer may have been preempted, or be dead).
        """
        view = self.view
        spins, deadline, pause = _SPINS, 0.0, 0.0001
        while True:
            before = view[at]
            if not before & 1:
                values: list[int] = view[at : at + count].tolist()
                if view[at] == before:
                    return values
            if spins:
                spins -= 1
                continue
            if not deadline:
                deadline = time.monotonic() + patience
            elif time.monotonic() >= deadline:
                return None
            threads.sleep(pause)
            pause = min(pause * 2, 0.01)

    def _is_record(self, at: int) -> bool:
        if GENERATIONS_AT <= at < SLOTS_AT:
            return (at - GENERATIONS_AT) % GENERATION_WORDS == 0
        return SLOTS_AT <= at < SLOTS_AT + self.slots * SLOT_WORDS and (
            at - SLOTS_AT) % SLOT_WORDS == 0
