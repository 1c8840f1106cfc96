"""Tell systemd what the lifecycle sees (the ``sd_notify`` protocol, SPEC section 9).

Gunicorn says ``READY=1`` as soon as its master has sockets, before any worker
exists, and nothing after. With the plugin, the process that sees a moment says
it (the unit needs ``NotifyAccess=all``):

- ``MAINPID=<its master>`` and ``READY=1`` when the newest generation (by
  lineage) is ready (section 8): after a ``USR2``, systemd follows the new
  master and keeps the unit when the old one exits, also when a ``HUP`` reached
  the new master first; the readiness of an older lineage (the old master's
  ``HUP`` during the overlap) is not systemd's business;
- ``RELOADING=1`` with ``MONOTONIC_USEC`` at a ``HUP`` of the newest master;
- ``STOPPING=1`` when the last generation's master stops; ``MAINPID=<newest
  master>`` when an old master retires after ``USR2`` (even before its successor
  is ready); ``MAINPID=<parent>`` when a new master exits or dies and the one it
  was started from lives on (a rollback);
- ``STATUS=`` with the generations and their workers at each event;
- ``WATCHDOG=1`` from the node's sweep, when ``WatchdogSec=`` is set, as long as
  the newest generation's master lives and its workers' heartbeats are fresh.

Moments are found under the state lock and said after it is released: a
datagram never holds the lock. How a datagram is sent is given by the caller
(:mod:`hooks` passes Gunicorn's own ``sd_notify``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from .layout import GenerationState
from .state import Generation, State

Send = Callable[[str], None]


class Moment(Enum):
    READY = "ready"
    RELOADING = "reloading"  # of the generation the HUP opened
    STOPPING = "stopping"
    HANDED_OVER = "handed over"  # an old master retires: a newer master serves
    ROLLED_BACK = "rolled back"
    ALIVE = "alive"  # a sweep found the newest generation healthy: the watchdog's ping


class Systemd:
    """The notifications of one process; ``send`` puts one datagram on the socket."""

    def __init__(self, send: Send, watchdog: bool) -> None:
        self.send = send
        self.watchdog = watchdog

    def message(self, state: State, moments: list[tuple[Moment, Generation]],
                changed: bool) -> str:
        """One datagram for ``moments``, with a STATUS line; empty if there is nothing to say
        (no moment, and the counts not ``changed``)."""
        newest = state.newest_serving()
        found: dict[str, None] = {}  # in order, each once (a master closes several at exit)
        for moment, gen in moments:
            is_newest = newest is not None and gen.number == newest.number
            if moment == Moment.READY and is_newest:
                found[f"MAINPID={gen.master_pid}\nREADY=1"] = None
            elif moment == Moment.RELOADING and is_newest:
                found[f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}"] = None
            elif moment == Moment.STOPPING:
                found["STOPPING=1"] = None
            elif moment == Moment.HANDED_OVER and newest is not None:
                found[f"MAINPID={newest.master_pid}"] = None
            elif moment == Moment.ROLLED_BACK:
                found[f"MAINPID={gen.parent_pid}"] = None
            elif moment == Moment.ALIVE and self.watchdog:
                found["WATCHDOG=1"] = None
        if not (found or changed):
            return ""
        return "\n".join([*found, f"STATUS={status_line(state)}"])


def status_line(state: State) -> str:
    """One line for ``systemctl status``: each serving generation, its workers, ready or not."""
    counted = state.counted()
    parts = []
    for gen in sorted(state.generations(), key=lambda g: g.lineage):
        if gen.serving:
            how = ("closing" if gen.state == GenerationState.SUPERSEDED else
                   "ready" if gen.ready else "starting")
            parts.append(f"generation {gen.number} ({gen.opened.text}, {how}): "
                         f"{counted[gen.number]} of {gen.target} workers")
    return "; ".join(parts) or "no generation open"
