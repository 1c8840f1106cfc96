"""A generation is ready once its booted workers first reach its master's worker count:
``master_ready`` runs once, where that happened, and the state says so (SPEC section 8)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gated import Gate
from states import turn_held

from gunicorn_lifecycle.status import read_status
from harness import Server, check_record, wait_for

Make = Callable[..., Server]


def generation(s: Server, number: int) -> dict[str, Any]:
    return next(g for g in read_status(s.state_file)["generations"] if g["generation"] == number)


def booted(s: Server, number: int) -> int:
    return sum(w["booted"] and not w["lost"] for w in generation(s, number)["workers"])


def registered_in(s: Server, number: int) -> list[int]:
    """The workers of generation ``number`` registered now (booted or not), oldest first."""
    return sorted(w["pid"] for w in generation(s, number)["workers"] if not w["lost"])


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


def test_ttou_that_stops_a_worker_still_booting_makes_the_generation_ready_in_the_master(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.2, failed=1.0))
    oldest, youngest = s.wait_registered(2)
    number = s.events("master_start")[0]["generation"]
    gate.let_pid(youngest)
    wait_for(lambda: booted(s, number) == 1, "the youngest worker booted")
    s.signal(signal.SIGTTOU)  # Gunicorn stops the oldest, still booting: one booted is enough
    (ready,) = s.wait_count("master_ready", 1)
    assert ready["in_pid"] == s.pid and ready["generation"] == number
    assert generation(s, number)["ready"] and generation(s, number)["target"] == 1
    s.wait_exit(oldest)
    s.stop()
    assert len(s.events("master_ready")) == 1
    check_record(s.events())


def test_ttou_that_stops_a_booted_worker_leaves_the_generation_not_ready(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=3, interval=0.2, failed=1.0))
    oldest, middle, youngest = s.wait_registered(3)
    number = s.events("master_start")[0]["generation"]
    gate.let_pid(oldest)
    gate.let_pid(middle)
    wait_for(lambda: booted(s, number) == 2, "two of three workers booted")
    s.signal(signal.SIGTTOU)  # the target is 2, but Gunicorn stops the oldest, booted one
    s.wait_count("worker_exit", 1, pid=oldest)
    wait_for(lambda: booted(s, number) == 1 and generation(s, number)["target"] == 2,
             "one booted worker left of a target of two")
    assert not s.events("master_ready") and not generation(s, number)["ready"]
    gate.let_pid(youngest)
    (ready,) = s.wait_count("master_ready", 1)
    assert ready["in_pid"] == youngest
    s.stop()
    check_record(s.events())


def test_a_worker_that_booted_while_taken_for_lost_completes_readiness_when_back(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.1, failed=0.2))
    first, second = s.wait_registered(2)
    number = s.events("master_start")[0]["generation"]
    gate.let_pid(first)
    wait_for(lambda: booted(s, number) == 1, "the first worker booted")
    os.kill(first, signal.SIGSTOP)
    try:
        s.wait_count("worker_lost", 1, pid=first)  # found by the second one's sweep
        gate.let_pid(second)
        wait_for(lambda: booted(s, number) == 1 and any(
            w["pid"] == second and w["booted"] for w in generation(s, number)["workers"]),
            "the second worker booted while the first counts as lost")
        assert not s.events("master_ready")
    finally:
        os.kill(first, signal.SIGCONT)
    s.wait_count("worker_start", 1, pid=first, reason="resume")
    (ready,) = s.wait_count("master_ready", 1)
    assert ready["in_pid"] == first and booted(s, number) == 2
    s.stop()
    check_record(s.events())


def test_a_hup_that_changes_the_worker_count_leaves_the_old_generation_alone(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.server(server, workers=3, interval=0.2, failed=1.0)
    s.conf.write_text(s.conf.read_text().replace("workers = 3", "import os\n"
                                                 "workers = int(os.environ.get('WORKERS', 3))"))
    gate.start(s, wait_workers=3)
    number = s.events("master_start")[0]["generation"]
    gate.let(2)
    wait_for(lambda: booted(s, number) == 2, "two of three workers booted")
    s.conf.write_text(s.conf.read_text().replace("os.environ.get('WORKERS', 3)", "2"))
    s.signal(signal.SIGHUP)
    reload = s.wait_count("master_start", 2)[-1]
    assert generation(s, reload["generation"])["target"] == 2, "the new count is the new one's"
    old = [g for g in read_status(s.state_file)["generations"] if g["generation"] == number]
    assert not old or (old[0]["target"], old[0]["ready"]) == (3, False), old
    new = wait_for(lambda: len(found := registered_in(s, reload["generation"])) == 2 and found,
                   "the new generation's two workers registered")
    for pid in new:
        gate.let_pid(pid)  # not the old worker still waiting: it may take any token
    ready = s.wait_count("master_ready", 1)
    assert [e["generation"] for e in ready] == [reload["generation"]]
    s.stop()
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


def test_master_ready_waits_out_a_busy_turn_and_is_delivered_once(
    server: Make, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.1, failed=0.3, lock_timeout=0.5))
    s.wait_registered(2)
    with turn_held(s.state_file):  # another live process holds the turn for as long as it likes
        gate.let(2)
        wait_for(lambda: "master_ready stays owed" in s.log_text(),
                 "the ready worker to give up on the turn")
        assert generation(s, 1)["ready"] and not s.events("master_ready")
    s.wait_count("master_ready", 1)  # a later sweep delivers it
    s.stop()
    assert len(s.events("master_ready")) == 1
    check_record(s.events())
