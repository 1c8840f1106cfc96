"""A lock-free snapshot of the state, for the status command and monitoring.

It copies each record with the sequence check of :mod:`protocol`, so it never
shows a half-written record (one it cannot copy whole is listed as unknown),
and it takes no lock a server could wait on. Every field is checked, since the
file may be damaged or not ours.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import LifecycleError
from .layout import (
    GENERATION_WORDS,
    GENERATIONS,
    SLOT_WORDS,
    SLOTS_AT,
    GenerationState,
    H,
    Readiness,
    Reason,
    S,
    SlotState,
    generation_at,
    index_of,
    slot_at,
    term_of,
)
from .liveness import Here
from .protocol import Words
from .state import State, decode_generation, decode_slot
from .statefile import open_for_reading


def read_status(path: str) -> dict[str, Any]:
    """The SPEC's status object for the state file at ``path``."""
    with open_for_reading(path) as file:
        return snapshot(file.words, file.fd)


def snapshot(words: Words, fd: int) -> dict[str, Any]:
    """Generations in use with their workers; LifecycleError if a record is corrupt.

    ``fd``: a descriptor of the file, to see which masters are present.
    """
    now = time.monotonic_ns()
    here = Here(State(words), fd)
    generations: dict[int, dict[str, Any]] = {}
    overruns: dict[int, int] = {}
    namespaces: dict[int, int] = {}
    unknown = []
    for index in range(GENERATIONS):
        values = words.read(generation_at(index), GENERATION_WORDS)
        if values is None:
            unknown.append(f"generation record {index}")
            continue
        gen = decode_generation(index, values, words.path)
        if gen.state == GenerationState.FREE:
            continue
        if gen.number in generations:
            raise LifecycleError(f"state file {words.path}: generation {gen.number} is recorded "
                                 "twice; stop the servers that use it and remove it")
        overruns[gen.number], namespaces[gen.number] = gen.overrun, gen.pidns
        generations[gen.number] = {
            "generation": gen.number,
            "master_pid": gen.master_pid,
            "parent_pid": gen.parent_pid,
            "opened_at": gen.opened_at / 1e9,
            "reason": gen.opened.text,
            "depth": gen.depth,
            "open": gen.serving,
            "ready": gen.ready != Readiness.NOT_YET,
            "target": gen.target,
            "closing": gen.state == GenerationState.SUPERSEDED,
            "closed": None if gen.closed == Reason.NONE else gen.closed.text,
            "master_alive": here.master_alive(gen),
            "leader": None,
            "workers": [],
        }
    # Two loads, not one copy: a change between them shows no leader for that moment.
    leader, leader_token = words[H.LEADER], words[H.LEADER_TOKEN]
    states = words.column(SLOTS_AT + S.STATE, SLOT_WORDS, words.slots)
    sequences = words.column(SLOTS_AT + S.SEQ, SLOT_WORDS, words.slots)
    for index in range(words.slots):
        if states[index] == SlotState.FREE and sequences[index] % 2 == 0:
            continue  # free and not being written: nothing to copy (most slots, mostly)
        values = words.read(slot_at(index), SLOT_WORDS)
        if values is None:
            unknown.append(f"worker slot {index}")
            continue
        slot = decode_slot(index, values, words.path)
        if slot.state == SlotState.FREE or slot.generation not in generations:
            continue
        age = (now - slot.heartbeat) / 1e9
        lost = slot.state == SlotState.LOST
        leads = (index_of(leader) == index and slot.booted and not lost
                 and slot.owner == leader_token)
        if leads:
            generations[slot.generation]["leader"] = {"pid": slot.pid, "term": term_of(leader)}
        generations[slot.generation]["workers"].append({
            "pid": slot.pid,
            "id": f"{slot.generation}-{slot.pid}",
            "booted": slot.booted,
            "heartbeat_age": round(age, 3),
            "late": not lost and age * 1e9 > overruns[slot.generation],
            "lost": slot.reason.text if lost else None,
            "alive": here.alive(slot.pid, slot.started, namespaces[slot.generation]),
            "leader": leads,
        })
    return {"state_file": words.path, "unknown": unknown,
            # Ordered by lineage, as the events are: a USR2 master's generations after all of
            # its parent's, even one a HUP of the parent opened later, with a higher number.
            "generations": sorted(generations.values(),
                                  key=lambda g: (g["depth"], g["generation"])),
            "seen": seen(words)}


# What the tallies count, and for which reasons (SPEC section 4).
TALLIES = {
    "master_start": (H.OPENED_TALLY, (Reason.START, Reason.RESTART, Reason.RELOAD,
                                      Reason.UPGRADE)),
    "master_exit": (H.CLOSED_TALLY, (Reason.STOP, Reason.RELOAD, Reason.UPGRADE,
                                     Reason.ROLLBACK, Reason.CRASH)),
    "worker_lost": (H.LOST_TALLY, (Reason.CRASH, Reason.HEARTBEAT, Reason.TIMEOUT)),
}


def seen(words: Words) -> dict[str, dict[str, int]]:
    """Generations opened and closed, workers lost, by reason, since the file was made.

    Each tally is one word, loaded once: a count, never a torn one.
    """
    return {event: {reason.text: words[table + reason] for reason in reasons}
            for event, (table, reasons) in TALLIES.items()}
