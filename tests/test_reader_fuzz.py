"""The reader on untrusted bytes: a consistent snapshot or a LifecycleError, never a write."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from states import add_generation, add_worker, fresh, state_of

from gunicorn_lifecycle import LifecycleError, layout
from gunicorn_lifecycle.protocol import Words
from gunicorn_lifecycle.status import read_status, snapshot

SLOTS = 4


def valid_state() -> bytes:
    buf = fresh(SLOTS)
    state = state_of(buf, "valid")
    for index, (number, reason) in enumerate(((2, layout.Reason.START),
                                              (3, layout.Reason.RESTART))):
        add_generation(state, index, number, master_pid=os.getpid(), master_started=1,
                       reason=reason)
        add_worker(state, index, number, os.getpid(), 1)
    return bytes(buf)


VALID = valid_state()


def read(data: bytes) -> dict[str, Any] | None:
    """Read ``data`` as a state file on disk; check the file is left as it was."""
    with tempfile.NamedTemporaryFile(suffix=".state") as f:
        f.write(data)
        f.flush()
        os.chmod(f.name, 0o600)
        try:
            report = read_status(f.name)
        except LifecycleError:
            report = None
        with open(f.name, "rb") as again:
            assert again.read() == data, "the reader wrote"
    try:
        slots = layout.check_header(data, len(data), "fuzz")
        # A read-only buffer: a reader that tried to write would raise.
        with open(os.devnull) as nothing:
            in_memory = snapshot(Words(memoryview(data), slots, "fuzz"), nothing.fileno())
    except LifecycleError:
        in_memory = None
    assert (report is None) == (in_memory is None)
    return report


def consistent(report: dict[str, Any]) -> None:
    numbers = [g["generation"] for g in report["generations"]]
    assert numbers == sorted(set(numbers))
    for gen in report["generations"]:
        assert gen["reason"] in ("start", "restart", "reload", "upgrade")
        assert isinstance(gen["closing"], bool) and gen["master_alive"] in (True, False, None)
        for worker in gen["workers"]:
            assert worker["id"] == f"{gen['generation']}-{worker['pid']}"
            assert isinstance(worker["booted"], bool) and isinstance(worker["late"], bool)


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2 * len(VALID)))
def test_arbitrary_bytes(data: bytes) -> None:
    report = read(data)
    if report is not None:
        consistent(report)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=12),
       st.integers(-len(VALID), 64))
def test_mutations_of_a_valid_file(changes: list[tuple[int, int]], resize: int) -> None:
    data = bytearray(VALID)
    for offset, value in changes:
        data[offset] = value
    if resize < 0:
        del data[resize:]
    else:
        data.extend(b"\0" * resize)
    report = read(bytes(data))
    if report is not None:
        consistent(report)


def test_the_valid_file_reads_as_written() -> None:
    report = read(VALID)
    assert report is not None
    assert [(g["generation"], g["reason"], [w["pid"] for w in g["workers"]])
            for g in report["generations"]] == [(2, "start", [os.getpid()]),
                                                (3, "restart", [os.getpid()])]
