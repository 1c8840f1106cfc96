"""The election: its rules on crafted states, and hammered across processes without Gunicorn,
faster than Gunicorn could.

Workers (the library's own ``Worker``, each in a forked process) register, boot,
beat and sweep on one state file at ``interval=0.01``; they live a random while,
then exit cleanly or are killed with SIGKILL at any step: inside a section,
between an election and its ``leader_start``, inside a callback. The test process
serves as their master (it shows its presence, as a master does) and keeps six
of them running. Every ``leader_start`` and ``leader_stop`` is appended to a
record with one write.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from states import add_generation, add_worker, fresh, state_of
from test_protocol import _Log

from gunicorn_lifecycle.events import Event
from gunicorn_lifecycle.layout import (
    TERMS,
    Flag,
    GenerationState,
    H,
    Readiness,
    Reason,
    S,
    index_of,
    leader_word,
    slot_at,
    term_of,
)
from gunicorn_lifecycle.leader import keep, leader_index
from gunicorn_lifecycle.liveness import show_presence
from gunicorn_lifecycle.options import Options
from gunicorn_lifecycle.process import boot_id
from gunicorn_lifecycle.state import State
from gunicorn_lifecycle.statefile import open_for_server
from gunicorn_lifecycle.transaction import Transactions
from gunicorn_lifecycle.worker import Worker

SLOTS = 32
WORKERS = 6
SECONDS = 10.0


def _writer(record: str, what: str):  # type: ignore[no-untyped-def]
    def callback(event: Event) -> None:
        fd = os.open(record, os.O_WRONLY | os.O_APPEND)
        os.write(fd, f"{what} {event.term} {os.getpid()}\n".encode())
        os.close(fd)
    return callback


def elector(path: str, record: str, seed: int) -> None:
    """One worker's life, in a forked child: never returns."""
    try:
        rng = random.Random(seed)
        options = Options({"leader_start": (_writer(record, "start"),),
                           "leader_stop": (_writer(record, "stop"),)},
                          interval=0.01, failed=0.03, lock_timeout=5.0)
        transactions = Transactions(open_for_server(path, SLOTS), _Log())
        worker = Worker(transactions, 1, options, server=None, worker=None)
        worker.start()
        worker.booted()
        time.sleep(rng.uniform(0, 0.1))
        if rng.random() < 0.5:
            worker.exit()
    finally:
        os._exit(0)


def test_never_two_leader_starts_for_one_term(tmp_path: Path) -> None:
    path, record = str(tmp_path / "election.state"), str(tmp_path / "leaders")
    Path(record).touch()
    transactions = Transactions(open_for_server(path, SLOTS), _Log())
    with transactions.bookkeeping("register", 1.0) as state:
        add_generation(state, 0, 1, overrun=int(0.04e9))
        state.set_header(H.BOOT_ID, boot_id()[0])
        state.set_header(H.BOOT_ID + 1, boot_id()[1])
    show_presence(transactions.file.fd, 0, True)  # its master lives: the test process
    view = transactions.state.words.view
    rng = random.Random(15)
    children: set[int] = set()
    killed = spawned = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            while len(children) < WORKERS:
                seed = rng.randrange(2**32)
                pid = os.fork()
                if pid == 0:
                    elector(path, record, seed)
                children.add(pid)
                spawned += 1
            time.sleep(rng.uniform(0, 0.02))
            index = index_of(view[H.LEADER])
            leader = view[slot_at(index) + S.PID] if index is not None else 0
            if rng.random() < 0.5:
                victim = leader if leader in children and rng.random() < 0.7 else rng.choice(
                    sorted(children))
                os.kill(victim, signal.SIGKILL)
                killed += 1
            for pid in list(children):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.remove(pid)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    lines = [line.split() for line in Path(record).read_text().splitlines()]
    starts = [int(term) for what, term, _ in lines if what == "start"]
    assert len(starts) == len(set(starts)), "two leader_start for one term"
    assert starts == sorted(starts), "a leader_start of an older term came after a newer one"
    leading: dict[str, int] = {}
    for what, term, pid in lines:
        if what == "start":
            leading[pid] = int(term)
        else:
            assert leading.pop(pid, None) == int(term), f"{pid} stopped term {term} it never led"
    assert len(starts) >= 100, f"only {len(starts)} terms ({spawned} workers, {killed} killed)"
    print(f"{len(starts)} leader_start in {SECONDS:.0f}s, last term {term_of(view[H.LEADER])}, "
          f"{spawned} workers, {killed} killed")


# The rules of one election, on crafted states.

def _state_with(*generations: tuple[int, Readiness, GenerationState, int]) -> State:
    """Generations (number, readiness, state, depth), each with two booted workers, freshly
    beaten: the second worker of each beat last. The last term was 100, and nobody leads."""
    state = state_of(fresh(16))
    state.set_header(H.LEADER, leader_word(100, None))
    now = time.monotonic_ns()
    for index, (number, ready, kind, depth) in enumerate(generations):
        add_generation(state, index, number)
        state.set_generation(index, ready=ready, depth=depth, state=kind)
        for k in range(2):
            add_worker(state, 2 * index + k, number, 1000 + 2 * index + k, 1, heartbeat=now + k)
    return state


def _leader(state: State) -> tuple[int, int] | None:
    """(term, pid) of the leader the state names."""
    index = leader_index(state)
    return None if index is None else (term_of(state.header(H.LEADER)), state.slot(index).pid)


def test_the_newest_ready_open_generation_leads_and_keeps_it() -> None:
    state = _state_with((1, Readiness.TOLD, GenerationState.OPEN, 0),
                        (2, Readiness.NOT_YET, GenerationState.OPEN, 0),
                        (3, Readiness.TOLD, GenerationState.SUPERSEDED, 1))
    keep(state)
    assert _leader(state) == (101, 1001), "ready before newer; superseded never; freshest beat"
    keep(state)
    assert _leader(state) == (101, 1001), "kept: no new term while it can lead"
    state.set_generation(1, ready=Readiness.READY)  # generation 2 is ready now: no preemption
    keep(state)
    assert _leader(state) == (101, 1001)
    state.release(1)  # the leader is gone: the newest ready generation
    keep(state)
    assert _leader(state) == (102, 1003)


def test_who_can_never_be_elected() -> None:
    state = _state_with((1, Readiness.TOLD, GenerationState.OPEN, 0))
    state.set_flags(0, Flag.COUNTED)  # still booting
    state.words[slot_at(1) + S.HEARTBEAT] = time.monotonic_ns() - 2 * 10**9  # late: 1 s overrun
    keep(state)
    assert _leader(state) is None and state.header(H.LEADER) == leader_word(100, None), "none"
    state.words[slot_at(1) + S.HEARTBEAT] = time.monotonic_ns()
    keep(state)
    assert _leader(state) == (101, 1001)
    state.lose(1, Reason.HEARTBEAT, time.monotonic_ns())
    keep(state)
    assert _leader(state) is None and term_of(state.header(H.LEADER)) == 101, "vacant, term kept"
    state.set_flags(0, Flag.BOOTED | Flag.COUNTED)
    keep(state)
    assert _leader(state) == (102, 1000), "each election a new term"


def test_a_leader_that_registered_again_is_elected_anew() -> None:
    state = _state_with((1, Readiness.TOLD, GenerationState.OPEN, 0))
    keep(state)
    assert _leader(state) == (101, 1001)
    state.reclaim(1, state.take_token(), time.monotonic_ns() + 10)  # lost, then back
    keep(state)
    assert _leader(state) == (102, 1001), "the old token no longer leads: a new term"


def test_a_scribbled_or_exhausted_leader_word_is_mended() -> None:
    state = _state_with((1, Readiness.TOLD, GenerationState.OPEN, 0))
    state.set_header(H.LEADER, leader_word(7, 15))  # a slot that is free
    keep(state)
    assert _leader(state) == (8, 1001)
    for scribbled in ((1 << 63) - 1, -1):  # the last term and a slot past the capacity; words
        state.set_header(H.LEADER, scribbled)  # are signed: a scribbled one may be negative
        keep(state)
        assert _leader(state) == (_clock_term(state), 1001), "from the clock again"
    assert term_of((1 << 63) - 1) == TERMS - 1
    assert index_of(leader_word(3, None)) is None and index_of(leader_word(3, 0)) == 0


def _clock_term(state: State) -> int:
    """The state's term, checked to be the wall clock in milliseconds (a minute's leeway)."""
    term = term_of(state.header(H.LEADER))
    assert abs(term - time.time_ns() // 10**6) < 60_000, term
    return term


def test_the_first_term_of_a_new_state_file_is_the_clock_so_terms_never_go_back() -> None:
    state = _state_with((1, Readiness.TOLD, GenerationState.OPEN, 0))
    state.set_header(H.LEADER, 0)  # a new file: a reboot emptied the runtime directory
    keep(state)
    assert _leader(state) == (_clock_term(state), 1001)
    assert _clock_term(state) < TERMS, "and it fits the word until the year 2248"
