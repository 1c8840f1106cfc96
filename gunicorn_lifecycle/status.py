"""A lock-free snapshot of the state, for the status command and monitoring.

It reads record by record with the sequence check of :mod:`layout`, so it never
shows a half-written record, and it takes no lock a server could wait on.
Every field is checked, since the file may be damaged or not ours.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import LifecycleError
from .layout import GENERATIONS, MASTER_REASONS, GenerationState, SlotState, StateView
from .process import is_alive
from .statefile import open_for_reading


def read_status(path: str) -> dict[str, Any]:
    """The SPEC's status object for the state file at ``path``."""
    return snapshot(open_for_reading(path).view)


def snapshot(view: StateView) -> dict[str, Any]:
    """Open generations with their workers; LifecycleError if a record is corrupt."""
    now = time.monotonic_ns()
    generations: dict[int, dict[str, Any]] = {}
    for index in range(GENERATIONS):
        record = view.consistent_generation(index)
        if record.state not in tuple(GenerationState) or record.reason >= len(MASTER_REASONS) or (
            record.is_open and record.reason == 0
        ):
            raise _corrupt(view, f"generation record {index}")
        if record.is_open:
            if record.generation in generations:
                raise _corrupt(view, f"generation {record.generation} (twice)")
            generations[record.generation] = {
                "generation": record.generation,
                "master_pid": record.master_pid,
                "parent_pid": record.parent_pid,
                "opened_at": record.opened_at,
                "reason": MASTER_REASONS[record.reason],
                "open": True,
                "closing": record.state == GenerationState.SUPERSEDED,
                "master_alive": is_alive(record.master_pid, record.master_started),
                "workers": [],
            }
    for index in range(view.slots):
        slot = view.consistent_slot(index)
        if slot.state not in tuple(SlotState) or slot.booted not in (0, 1):
            raise _corrupt(view, f"worker slot {index}")
        if slot.registered and slot.generation in generations:
            age = (now - slot.heartbeat) / 1e9
            generations[slot.generation]["workers"].append({
                "pid": slot.pid,
                "id": f"{slot.generation}-{slot.pid}",
                "booted": bool(slot.booted),
                "heartbeat_age": round(age, 3),
                "late": age * 1e9 > slot.overrun,
                "alive": is_alive(slot.pid, slot.started),
            })
    return {"state_file": view.path,
            "generations": [generations[number] for number in sorted(generations)]}


def _corrupt(view: StateView, what: str) -> LifecycleError:
    return LifecycleError(f"state file {view.path}: {what} is corrupt; stop the servers that "
                          "use it and remove it")
