"""The state file's layout, its records and the protocol's single-process rules."""

from __future__ import annotations

import threading

import pytest
from states import add_generation, fresh, state_of

from gunicorn_lifecycle import LifecycleError, layout
from gunicorn_lifecycle.layout import Flag, G, GenerationState, H, Reason, S, SlotState


def test_sizes_are_fixed() -> None:
    assert layout.HEADER_WORDS * 8 == 640
    assert layout.GENERATION_WORDS * 8 == 192 and layout.SLOT_WORDS * 8 == 64
    assert layout.QUEUE_WORDS * 8 == 32 and layout.queue_size(256) == 2 * 256 + 32
    assert layout.file_size(256) == 640 + 32 * 192 + 256 * 64 + 544 * 32 == 40_576
    assert max(H) < layout.HEADER_WORDS and max(G) < layout.GENERATION_WORDS
    assert max(S) < layout.SLOT_WORDS and max(layout.Q) < layout.QUEUE_WORDS


def test_new_file_is_all_free() -> None:
    state = state_of(fresh(4))
    assert state.header(H.NEXT_GENERATION) == state.header(H.NEXT_TOKEN) == 1
    assert state.header(H.SERVING) == state.header(H.NEXT_TICKET) == 1  # nobody has the turn
    assert state.generations() == [] and state.slots_in(*SlotState) == [
        state.slot(i) for i in range(4)]
    assert all(s.state == SlotState.FREE for s in state.slots_in(*SlotState))


def test_records_round_trip_with_even_sequences() -> None:
    state = state_of(fresh(4))
    add_generation(state, 3, 7, master_pid=100, master_started=5)
    gen = state.generation(7)
    assert gen is not None and (gen.index, gen.master_pid, gen.state) == (3, 100,
                                                                         GenerationState.OPEN)
    state.register(2, 42, 7, 4242, 99, 123, Flag.BOOTED)
    slot = state.slot(2)
    assert (slot.owner, slot.state, slot.pid, slot.heartbeat, slot.booted, slot.counted) == (
        42, SlotState.REGISTERED, 4242, 123, True, False)
    state.lose(2, Reason.HEARTBEAT, 555)
    slot = state.slot(2)
    assert (slot.owner, slot.state, slot.reason, slot.heartbeat, slot.booted) == (
        0, SlotState.LOST, Reason.HEARTBEAT, 555, True)
    state.reclaim(2, 43, 777)
    assert (state.slot(2).owner, state.slot(2).state) == (43, SlotState.REGISTERED)
    state.release(2)
    assert state.slot(2).state == SlotState.FREE and state.slot(2).owner == 0
    for at in (layout.generation_at(3), layout.slot_at(2)):
        assert state.words[at] % 2 == 0 and state.words[at] > 0
    assert state.words[H.DIRTY] == 0


def test_a_change_cut_short_is_repaired_by_the_next_lock_holder() -> None:
    state = state_of(fresh(4))
    at = layout.slot_at(1)
    state.words[H.DIRTY] = at  # a writer died after it began the change
    state.words[at] = 3
    state.words[at + S.OWNER] = 9  # ...and stored the owner, not yet the state
    assert state.words.read(at, layout.SLOT_WORDS, patience=0.05) is None, "unknown, not free"
    state.words.repair()
    assert state.words[H.DIRTY] == 0 and state.words[at] == 4
    slot = state.slot(1)
    assert slot.state == SlotState.FREE, "a registration cut short means nothing"


def test_repair_refuses_a_dirty_mark_that_is_no_record() -> None:
    state = state_of(fresh(4))
    state.words[H.DIRTY] = layout.slot_at(1) + 3
    with pytest.raises(LifecycleError, match="starts no record"):
        state.words.repair()


def test_a_reader_waits_out_a_writer_preempted_mid_record() -> None:
    state = state_of(fresh(4))
    at = layout.slot_at(0)
    state.words[at] = 1  # a change begun, its writer descheduled
    finish = threading.Timer(0.2, lambda: state.words.change(at, [(S.PID, 42)]))
    finish.start()
    try:
        values = state.words.read(at, layout.SLOT_WORDS)
    finally:
        finish.join()
    assert values is not None and values[S.PID] == 42


@pytest.mark.parametrize(("data", "message"), [
    (b"", "only 0 bytes"),
    (b"x" * layout.file_size(4), "wrong magic"),
    (layout.new_file(4)[:-1], "need"),
    (layout.new_file(4) + b"\0" * 64, "need"),
])
def test_foreign_files_are_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(LifecycleError, match=message) as error:
        layout.check_header(data, len(data), "/some/where.state")
    assert "/some/where.state" in str(error.value)


@pytest.mark.parametrize(("word", "value", "message"), [
    (H.VERSION, 1, "format version 1"),
    (H.VERSION, 3, "format version 3"),
    (H.VERSION, 5, "format version 5"),
    (H.SLOTS, 0, "impossible capacity"),
    (H.GENERATIONS, 16, "impossible capacity"),
])
def test_headers_of_other_versions_and_capacities_are_refused(word: H, value: int,
                                                              message: str) -> None:
    buf = fresh(4)
    buf[word * 8 : word * 8 + 8] = value.to_bytes(8, "little")
    with pytest.raises(LifecycleError, match=message):
        layout.check_header(buf, len(buf), "/some/where.state")


def test_cut_short_means_a_strict_prefix_of_a_fresh_file() -> None:
    full = layout.new_file(8)
    assert layout.is_cut_short(b"") and layout.is_cut_short(full[:1])
    assert layout.is_cut_short(full[:30]) and layout.is_cut_short(full[:1000])
    assert not layout.is_cut_short(full), "complete"
    used = bytearray(full)
    used[layout.slot_at(0) * 8 + 8] = 1
    assert not layout.is_cut_short(bytes(used[:-8])), "holds data: not a creation cut short"
    assert not layout.is_cut_short(b"NOTOURS!")


@pytest.mark.parametrize(("word", "value", "what"), [
    (S.STATE, 7, "worker slot 1"),
    (S.FLAGS, 1 << 4, "worker slot 1"),
    (S.FLAGS, 99 << layout.REASON_SHIFT, "worker slot 1"),
])
def test_a_scribbled_slot_is_corrupt_by_name(word: S, value: int, what: str) -> None:
    state = state_of(fresh(4), "/x.state")
    state.words[layout.slot_at(1) + word] = value
    with pytest.raises(LifecycleError, match=rf"/x\.state: {what} is corrupt"):
        state.slot(1)


def test_a_scribbled_generation_is_corrupt_by_name() -> None:
    state = state_of(fresh(4), "/x.state")
    state.words[layout.generation_at(2) + G.STATE] = GenerationState.OPEN  # number 0, no master
    with pytest.raises(LifecycleError, match=r"/x\.state: generation record 2 is corrupt"):
        state.generations()
