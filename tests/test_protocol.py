"""The concurrency protocol under real concurrency: writers and readers in separate processes.

A writer changes a record (or a word) as fast as it can; readers copy it at the
same time and check every copy they accept. A copy is consistent when all its
words come from one change; a reader may give up on a record (unknown), never
accept a mixed copy. The control case runs the same readers against records
written the way this library wrote them before (``struct.pack_into``, which
clears a field before it writes it): the hammer must catch that.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

import pytest
from states import add_generation, state_of

from gunicorn_lifecycle import layout
from gunicorn_lifecycle.layout import H, S
from gunicorn_lifecycle.lifecycle import _overran
from gunicorn_lifecycle.lock import LockTimeout
from gunicorn_lifecycle.options import Options
from gunicorn_lifecycle.protocol import Words
from gunicorn_lifecycle.statefile import open_for_server
from gunicorn_lifecycle.transaction import Transactions
from gunicorn_lifecycle.worker import Worker

SLOTS = 4
RECORD = layout.slot_at(1)  # the record the writer changes
WORD = layout.slot_at(2) + S.HEARTBEAT  # the word the writer stores without the lock
READS = 10_000_000  # per kind, across the readers: a one-in-a-million tear shows
READERS = 2


PATTERN = 0x0101010101010101  # a word whose eight bytes are all equal: a torn load shows


def shared_state(path: Path) -> mmap.mmap:
    """A state file whose hammered record and word were written once already: no writer ever
    stores 0 there, so a 0 read back is a torn read (or a field cleared before it was set)."""
    path.write_bytes(layout.new_file(SLOTS))
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 0)
    words = words_of(mapping)
    words.change(RECORD, [(offset, 1) for offset in range(1, layout.SLOT_WORDS)])
    words[WORD] = PATTERN
    return mapping


def words_of(mapping: mmap.mmap) -> Words:
    return Words(memoryview(mapping), SLOTS, "hammer")


def protocol_writer(mapping: mmap.mmap, stop: Synchronized[int]) -> None:
    words = words_of(mapping)
    k = 1
    while not stop.value:
        words.change(RECORD, [(offset, k) for offset in range(1, layout.SLOT_WORDS)])
        words[WORD] = PATTERN * (k % 127 + 1)  # one store
        k += 1


def struct_writer(mapping: mmap.mmap, stop: Synchronized[int]) -> None:
    """Records and stamps as before: sequence made odd, then the whole record packed with
    pack_into; the stamp packed with pack_into too."""
    k = 2
    record = struct.Struct("<8q")
    while not stop.value:
        struct.pack_into("<q", mapping, RECORD * 8, k + 1)
        record.pack_into(mapping, RECORD * 8, k + 1, *([k] * 7))
        struct.pack_into("<q", mapping, RECORD * 8, k + 2)
        struct.pack_into("<q", mapping, WORD * 8, PATTERN * (k % 127 + 1))
        k += 2


def record_reader(mapping: mmap.mmap, reads: int, until_caught: bool,
                  results: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    """Copy the record ``reads`` times (``until_caught``: stop at the first mixed copy); count
    accepted copies, *changes* (copies that differ from the one before: a write ran between
    two reads, the readers' measure of their overlap with the writer) and mixed copies."""
    words = words_of(mapping)
    accepted = changes = mixed = 0
    last: list[int] | None = None
    for _ in range(reads):
        values = words.read(RECORD, layout.SLOT_WORDS, patience=0)  # spins, never sleeps
        if values is None:
            continue
        accepted += 1
        changes += values != last
        last = values
        if len(set(values[1:])) != 1 or values[1] == 0:  # no writer ever stores 0 there
            mixed += 1
            if until_caught:
                break
    results.put((accepted, changes, mixed))


def word_reader(mapping: mmap.mmap, reads: int, until_caught: bool,
                results: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    """Load the word ``reads`` times (``until_caught``: stop at the first torn load); count
    loads, changes (as for records) and torn loads."""
    view = words_of(mapping).view
    done = torn = changes = last = 0
    while done < reads:
        done += 1
        value = view[WORD]
        changes += value != last
        last = value
        if value % PATTERN or not 1 <= value // PATTERN <= 127:
            torn += 1
            if until_caught:
                break
    results.put((done, changes, torn))


def hammer(tmp_path: Path, writer: Callable[..., None], reader: Callable[..., None],
           reads: int, until_caught: bool = False) -> tuple[int, int, int]:
    """Run ``writer`` and READERS readers in separate processes; the readers' summed counts."""
    context = multiprocessing.get_context("fork")
    mapping = shared_state(tmp_path / "hammer.state")
    stop = context.Value("i", 0)
    results: multiprocessing.Queue[tuple[int, int, int]] = context.Queue()
    writing = context.Process(target=writer, args=(mapping, stop))
    readers = [context.Process(target=reader,
                               args=(mapping, reads // READERS, until_caught, results))
               for _ in range(READERS)]
    try:
        for process in (writing, *readers):
            process.start()
        totals = [results.get(timeout=300) for _ in readers]
    finally:
        stop.value = 1
        for process in (*readers, writing):
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    done, changes, bad = (sum(column) for column in zip(*totals, strict=True))
    return done, changes, bad


def test_no_mixed_record_is_ever_accepted(tmp_path: Path) -> None:
    accepted, changes, mixed = hammer(tmp_path, protocol_writer, record_reader, READS)
    assert accepted > READS // 2 and changes > 0
    assert mixed == 0, f"{mixed} mixed copies accepted out of {accepted} ({changes} changes)"


def test_no_word_stored_without_the_lock_is_ever_torn(tmp_path: Path) -> None:
    reads, changes, torn = hammer(tmp_path, protocol_writer, word_reader, READS)
    assert reads == READS and changes > 0
    assert torn == 0, f"{torn} torn loads out of {reads} ({changes} changes)"


# The negative controls: what this library wrote before must be caught. A copy or a load is
# caught only while the writer runs at the same moment; on a machine whose other work keeps
# them apart, the readers see few changes, and the control says so instead of passing blind.
CONTROL_READS = 40_000_000  # at most; a quiet machine catches one within the first 100,000
ENOUGH_CHANGES = 1_000_000


def control(tmp_path: Path, reader: Callable[..., None]) -> tuple[int, int, int]:
    done, changes, caught = hammer(tmp_path, struct_writer, reader, CONTROL_READS,
                                   until_caught=True)
    if not caught and changes < ENOUGH_CHANGES:
        pytest.skip(f"only {changes} changes seen in {done} reads: the writer and the readers "
                    "seldom ran at the same moment on this busy machine, too seldom to judge")
    return done, changes, caught


def test_the_hammer_catches_records_written_with_pack_into(tmp_path: Path) -> None:
    accepted, changes, mixed = control(tmp_path, record_reader)
    assert mixed > 0, f"no mixed copy in {accepted} reads ({changes} changes): the hammer is blind"


def test_the_hammer_catches_words_written_with_pack_into(tmp_path: Path) -> None:
    reads, changes, torn = control(tmp_path, word_reader)
    assert torn > 0, f"no torn load in {reads} reads ({changes} changes): the hammer is blind"


def in_process_worker(tmp_path: Path) -> Worker:
    """A registered, booted worker of this process, on a state file of its own."""
    path = str(tmp_path / "in-process.state")
    transactions = Transactions(open_for_server(path, SLOTS), _Log())
    with transactions.bookkeeping("register", 1.0) as state:
        add_generation(state, 0, 1)
    worker = Worker(transactions, 1, Options(interval=60.0), server=None, worker=None)
    worker.start()
    worker.heartbeat.stop()  # this test beats by hand
    return worker


class _Log:
    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object) -> None: ...
    def exception(self, msg: str, *args: object) -> None: ...


def stamper(worker: Worker, stop: Synchronized[int], clobbered: Synchronized[int]) -> None:
    """Stamp as a heartbeat does, from another process; count stamps someone else changed."""
    assert worker.index is not None
    view = worker.tx.state.words.view
    at = layout.slot_at(worker.index) + S.HEARTBEAT
    last = view[at]
    while not stop.value:
        if view[at] != last:
            clobbered.value += 1
        last = time.monotonic_ns()
        view[at] = last


def test_booted_never_overwrites_a_stamp_written_meanwhile(tmp_path: Path) -> None:
    worker = in_process_worker(tmp_path)
    context = multiprocessing.get_context("fork")
    stop, clobbered = context.Value("i", 0), context.Value("i", 0)
    stamping = context.Process(target=stamper, args=(worker, stop, clobbered))
    stamping.start()
    try:
        for _ in range(20_000):
            worker.booted()
    finally:
        stop.value = 1
        stamping.join(timeout=10)
    assert clobbered.value == 0, f"booted() wrote {clobbered.value} old stamps back"
    assert worker.index is not None and worker.tx.state.slot(worker.index).booted


def test_a_sweep_rechecks_a_stamp_before_it_declares_a_loss(tmp_path: Path) -> None:
    state = state_of(bytearray(layout.new_file(SLOTS)))
    now = time.monotonic_ns()
    state.words[layout.slot_at(0) + S.HEARTBEAT] = now  # fresh, beaten after the sweep read
    assert not _overran(state, 0, now - 10**10, 10**9), "an old copy is not the stamp"
    state.words[layout.slot_at(0) + S.HEARTBEAT] = now - 10**10
    assert _overran(state, 0, now - 10**10, 10**9)


def test_the_sweep_deadline_is_one_word_that_moves_once_per_interval(tmp_path: Path) -> None:
    worker = in_process_worker(tmp_path)
    words = worker.tx.state.words
    words[H.NEXT_SWEEP] = 0
    worker._last = time.monotonic_ns()
    worker.beat()
    deadline = words[H.NEXT_SWEEP]
    assert deadline > time.monotonic_ns() + 59 * 10**9, "due again one interval later"
    for _ in range(100):
        worker._last = time.monotonic_ns()
        worker.beat()
    assert words[H.NEXT_SWEEP] == deadline


def test_a_busy_lock_names_its_holder_when_the_timeout_is_read(tmp_path: Path) -> None:
    holder = Transactions(open_for_server(str(tmp_path / "busy.state"), SLOTS), _Log())
    waiter = Transactions(open_for_server(str(tmp_path / "busy.state"), SLOTS), _Log())
    asked: list[int] = []

    def named() -> str:
        asked.append(1)
        return "the sweeper"

    with holder.bookkeeping("sweep", 1.0):
        with pytest.raises(LockTimeout) as one_try, waiter.lock.hold(0, "resume", named):
            raise AssertionError("the lock was had twice")
        assert asked == [], "a one-try that finds the lock busy does not look up its holder"
        with pytest.raises(LockTimeout) as timed_out, waiter.bookkeeping("booted", 0.2):
            raise AssertionError("the lock was had twice")
    assert str(one_try.value).endswith("is held by the sweeper") and asked == [1]
    assert str(one_try.value) == str(one_try.value) and asked == [1], "looked up once"
    message = str(timed_out.value)
    assert message.startswith("gave up on booted in pid ") and "after 0.2s" in message
    assert message.endswith(f"is held by pid {os.getpid()} (sweep)"), message
