"""A generation is ready once its booted workers first reach its master's worker count:
``master_ready`` runs once, where that happened, and the state says so (SPEC section 8)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gated import Gate

from gunicorn_lifecycle.status import read_status
from harness import Server, check_record, wait_for

Make = Callable[..., Server]


def generation(s: Server, number: int) -> dict[str, Any]:
    return next(g for g in read_status(s.state_file)["generations"] if g["generation"] == number)


def booted(s: Server, number: int) -> int:
    return sum(w["booted"] and not w["lost"] for w in generation(s, number)["workers"])


def test_ready_once_per_generation_after_its_last_boot_through_ttin_hup_and_usr2(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=3, interval=0.2, failed=1.0), wait_workers=3)
    first = s.events("master_start")[0]["generation"]
    assert (generation(s, first)["target"], generation(s, first)["ready"]) == (3, False)
    gate.let(2)
    wait_for(lambda: booted(s, first) == 2, "two workers booted")
    assert not s.events("master_ready") and not generation(s, first)["ready"]
    gate.let(1)
    (ready,) = s.wait_count("master_ready", 1)
    workers = {e["pid"] for e in s.events("worker_start")}
    assert ready["reason"] == "start" and ready["generation"] == first
    assert ready["pid"] == s.pid and ready["in_pid"] in workers, "run by the last worker booted"
    assert ready["n_mine"] == 3 and booted(s, first) == 3 and generation(s, first)["ready"]

    s.signal(signal.SIGTTIN)  # a fourth worker: the target follows, readiness stays once
    wait_for(lambda: generation(s, first)["target"] == 4, "the target to follow TTIN")
    gate.let(1)
    wait_for(lambda: booted(s, first) == 4, "the fourth worker booted")
    assert len(s.events("master_ready")) == 1

    s.signal(signal.SIGHUP)  # back to the config's 3 workers, in a new generation
    reload = s.wait_count("master_start", 2)[-1]
    assert generation(s, reload["generation"])["target"] == 3
    gate.let(3)
    ready = s.wait_count("master_ready", 1, generation=reload["generation"])[0]
    assert ready["reason"] == "reload" and ready["in_pid"] != s.pid
    s.wait_count("master_exit", 1, generation=first)

    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    gate.let(3)
    ready = s.wait_count("master_ready", 1, generation=upgrade["generation"])[0]
    assert ready["reason"] == "upgrade" and ready["pid"] == upgrade["in_pid"]
    new_workers = {e["pid"] for e in s.events("worker_start", generation=upgrade["generation"])}
    assert ready["in_pid"] in new_workers
    s.signal(signal.SIGTERM)  # the old master retires
    s.wait_exit()
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_count("master_exit", 1, generation=upgrade["generation"])
    assert len(s.events("master_ready")) == 3
    check_record(s.events())


def test_ttou_that_completes_readiness_runs_master_ready_in_the_master(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.2, failed=1.0), wait_workers=2)
    number = s.events("master_start")[0]["generation"]
    gate.let(1)
    wait_for(lambda: booted(s, number) == 1, "one of two workers booted")
    assert not s.events("master_ready")
    s.signal(signal.SIGTTOU)  # one worker is the target now, and one has booted
    (ready,) = s.wait_count("master_ready", 1)
    assert ready["in_pid"] == s.pid and ready["generation"] == number
    assert generation(s, number)["ready"] and generation(s, number)["target"] == 1
    gate.let(1)  # the survivor may be the one still waiting to boot
    s.stop()
    assert len(s.events("master_ready")) == 1
    check_record(s.events())


def test_a_generation_closed_before_it_was_ready_never_is(server: Make, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.2, failed=1.0), wait_workers=2)
    number = s.events("master_start")[0]["generation"]
    s.signal(signal.SIGHUP)
    s.wait_count("master_start", 2)
    gate.let(4)
    s.wait_count("master_exit", 1, generation=number)
    ready = s.wait_count("master_ready", 1)
    assert [e["generation"] for e in ready] == [number + 1], "the superseded one never is"
    s.stop()
    check_record(s.events())
