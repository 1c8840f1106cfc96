"""State files crafted for tests, written through the library's own record writers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gunicorn_lifecycle import layout
from gunicorn_lifecycle.process import own_start_time, pid_namespace
from gunicorn_lifecycle.protocol import Words
from gunicorn_lifecycle.state import State
from gunicorn_lifecycle.statefile import open_for_reading, open_for_server
from gunicorn_lifecycle.status import read_status


def fresh(slots: int = 8) -> bytearray:
    return bytearray(layout.new_file(slots))


def state_of(buf: bytearray | memoryview, path: str = "test.state") -> State:
    slots = layout.check_header(buf, len(buf), path)
    return State(Words(memoryview(buf), slots, path))


def add_generation(state: State, index: int, number: int, *, master_pid: int | None = None,
                   master_started: int | None = None, reason: layout.Reason = layout.Reason.START,
                   pidns: int | None = None, overrun: int = 10**9, announced: int = 1) -> None:
    """An open generation record, of this process unless told otherwise."""
    state.open_generation(
        index, number=number, opened=reason, closed=0, announced=announced,
        master_pid=os.getpid() if master_pid is None else master_pid,
        master_started=own_start_time() if master_started is None else master_started,
        pidns=pid_namespace() if pidns is None else pidns, parent_pid=0, parent_started=0,
        depth=0, gone=0, opened_at=0, overrun=overrun, closed_at=0)
    state.set_header(layout.H.NEXT_GENERATION, max(number + 1,
                                                   state.header(layout.H.NEXT_GENERATION)))


def add_worker(state: State, index: int, generation: int, pid: int, started: int,
               heartbeat: int = 0, flags: int = layout.Flag.BOOTED | layout.Flag.COUNTED) -> None:
    state.register(index, state.take_token(), generation, pid, started, heartbeat, flags)


def write(path: Path, buf: bytearray) -> None:
    path.write_bytes(bytes(buf))
    path.chmod(0o600)


def header_word(state_file: str, word: layout.H) -> int:
    with open_for_reading(state_file) as file:
        return file.words[word]


def registered(state_file: str) -> set[int]:
    """The pids of the workers the state counts as registered (not lost)."""
    return {w["pid"] for g in read_status(state_file)["generations"] for w in g["workers"]
            if not w["lost"]}


@contextmanager
def turn_held(state_file: str) -> Iterator[None]:
    """This process holds the node-wide turn of ``state_file``, as a callback that never
    returns would: it is alive, and makes no progress."""
    from gunicorn_lifecycle.transaction import Transactions

    transactions = Transactions(open_for_server(state_file, 1), logging.getLogger("test"))
    with transactions.bookkeeping("turn", 60.0) as state:
        transactions.turn.ask(state, "turn", 60.0)
    transactions.turn.wait("turn", 60.0)
    try:
        yield
    finally:
        transactions.turn.leave_alone(60.0)
