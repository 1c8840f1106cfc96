"""Older and newer follow lineage, not generation numbers (SPEC sections 3 and 4).

A ``HUP`` to the old master during a ``USR2`` overlap opens a generation whose
number is higher than the new master's, in the older lineage.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from harness import Server, check_record

Make = Callable[..., Server]


def overlap_then_old_reload(s: Server) -> tuple[int, int, int, int]:
    """USR2, then HUP to the old master: (first, new master's, old master's reload, new pid)."""
    s.start(wait_workers=2)
    first = s.events("master_start")[0]["generation"]
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.wait_count("worker_start", 2, generation=upgrade["generation"])
    s.signal(signal.SIGHUP)  # to the old master
    reload = s.wait_count("master_start", 1, reason="reload")[0]
    assert reload["in_pid"] == s.pid and reload["generation"] > upgrade["generation"]
    assert (reload["n_prev"], reload["n_next"]) == (2, 2), "before it: the first; after: USR2's"
    s.wait_count("worker_start", 2, generation=reload["generation"])
    drained = s.wait_count("master_exit", 1, generation=first)[0]
    assert drained["reason"] == "reload" and drained["n_next"] == 2
    return first, upgrade["generation"], reload["generation"], upgrade["in_pid"]


def test_the_old_masters_reload_during_an_upgrade_is_older(server: Make) -> None:
    s = server(workers=2)
    first, new, old_reload, new_master = overlap_then_old_reload(s)
    s.signal(signal.SIGTERM)  # the old master retires: an upgrade, though its number is higher
    s.wait_exit()
    retired = s.events("master_exit", generation=old_reload)[0]
    assert retired["reason"] == "upgrade" and retired["n_next"] == 2 and retired["n_prev"] is None
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    stop = s.events("master_exit", generation=new)[0]
    assert stop["reason"] == "stop" and stop["n_prev"] is None
    lineage = {first: (0, first), old_reload: (0, old_reload), new: (1, new)}
    check_record(s.events(), lineage=lineage.__getitem__)


def test_the_new_master_rolls_back_onto_the_old_masters_reload(server: Make) -> None:
    s = server(workers=2)
    first, new, old_reload, new_master = overlap_then_old_reload(s)
    s.signal(signal.SIGTERM, new_master)  # the new code is withdrawn
    s.wait_exit(new_master)
    rollback = s.events("master_exit", generation=new)[0]
    assert rollback["reason"] == "rollback" and rollback["n_prev"] == 2
    assert rollback["n_next"] is None
    s.stop()
    stop = s.events("master_exit", generation=old_reload)[0]
    assert stop["reason"] == "stop" and stop["n_next"] is None
    lineage = {first: (0, first), old_reload: (0, old_reload), new: (1, new)}
    check_record(s.events(), lineage=lineage.__getitem__)
