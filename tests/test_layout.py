"""The state file's layout and its lock-free reader, without Gunicorn."""

from __future__ import annotations

import struct
import threading

import pytest

from gunicorn_lifecycle import LifecycleError, layout


def view(slots: int = 4) -> layout.StateView:
    return layout.StateView(memoryview(bytearray(layout.new_file(slots))), "test.state")


def test_sizes_are_fixed() -> None:
    assert layout.HEADER.size <= layout.HEADER_SIZE == 64
    assert layout.GENERATION.size == layout.SLOT.size == 48
    assert layout.file_size(256) == 64 + 16 * 48 + 256 * 48 == 13_120


def test_new_file_is_all_free() -> None:
    v = view()
    assert v.next_generation() == 1 and v.last_sweep() == 0
    assert all(not g.is_open for _, g in v.locked_generations())
    assert all(not s.registered for _, s in v.locked_slots())


def test_records_round_trip_with_even_sequence() -> None:
    v = view()
    slot = layout.Slot(0, layout.SlotState.REGISTERED, 1, 7, 4242, 99, 123, 456)
    v.write_slot(2, slot)
    read = v.consistent_slot(2)
    assert read._replace(seq=0) == slot and read.seq % 2 == 0 and read.seq > 0
    assert v.stamp(2, 4242, 99, 789)
    assert v.consistent_slot(2).heartbeat == 789 == v.locked_slot(2).heartbeat
    assert not v.stamp(2, 4242, 98, 790) and not v.stamp(2, 4243, 99, 790)  # not its own
    assert not v.stamp(1, 4242, 99, 790)  # a free slot
    assert v.locked_slot(2).heartbeat == 789 and v.locked_slot(1).heartbeat == 0
    assert list(v.slot_uses())[2] == (layout.SlotState.REGISTERED, 7)
    assert v.sweep_candidates() == [2]
    struct.pack_into("<I", v.buf, layout.HEADER_SIZE + 16 * 48 + 3 * 48, 257)  # odd: torn
    assert v.sweep_candidates() == [2, 3]
    gen = layout.Generation(0, layout.GenerationState.OPEN, 1, 7, 100, 0, 5, 0, 1.5)
    v.write_generation(15, gen)
    assert v.consistent_generation(15)._replace(seq=0) == gen


def test_a_writer_killed_mid_record_is_repaired_by_the_next_write() -> None:
    v = view()
    at = layout.HEADER_SIZE + layout.GENERATIONS * layout.GENERATION.size
    struct.pack_into("<I", v.buf, at, 3)  # an odd counter: a write that never finished
    with pytest.raises(LifecycleError, match="half-written"):
        v.consistent_slot(0)
    v.write_slot(0, layout.FREE_SLOT)
    assert v.consistent_slot(0).seq % 2 == 0


def test_a_reader_waits_out_a_writer_preempted_mid_record() -> None:
    v = view()
    at = layout.HEADER_SIZE + layout.GENERATIONS * layout.GENERATION.size
    struct.pack_into("<I", v.buf, at, 3)  # a write begun, its writer descheduled
    finish = threading.Timer(0.2, v.write_slot, (0, layout.FREE_SLOT._replace(pid=42)))
    finish.start()
    try:
        assert v.consistent_slot(0).pid == 42
    finally:
        finish.join()


@pytest.mark.parametrize(("data", "message"), [
    (b"", "only 0 bytes"),
    (b"x" * layout.file_size(4), "wrong magic"),
    (layout.new_file(4)[:-1], "need"),
    (layout.new_file(4) + b"\0" * 48, "need"),
    (layout.HEADER.pack(layout.MAGIC, 2, 16, 4, 1, 0, 0, 0, b"").ljust(layout.file_size(4), b"\0"),
     "format version 2"),
    (layout.HEADER.pack(layout.MAGIC, 1, 16, 0, 1, 0, 0, 0, b"").ljust(layout.file_size(4), b"\0"),
     "impossible capacity"),
])
def test_foreign_files_are_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(LifecycleError, match=message) as error:
        layout.check_header(data, len(data), "/some/where.state")
    assert "/some/where.state" in str(error.value)
