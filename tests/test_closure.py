"""Every generation opens once and closes once, whatever happens to its master; every
worker ends once per start (SPEC sections 3 and 4, issue 12 points 1 to 4)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import gunicorn
import pytest

from gunicorn_lifecycle.status import read_status
from harness import Server, check_record, wait_for

Make = Callable[..., Server]


def test_a_killed_masters_generation_closes_as_a_crash_within_an_interval(server: Make) -> None:
    s = server(workers=2, interval=0.2, failed=0.5, settings="timeout = 2")
    s.start(wait_workers=2)
    s.wait_booted()
    orphans = [e["pid"] for e in s.events("worker_start")]
    killed_at = time.monotonic()
    s.signal(signal.SIGKILL)
    s.wait_exit()
    crash = s.wait_count("master_exit", 1)[0]
    assert crash["reason"] == "crash" and crash["in_pid"] in orphans, "found by an orphan"
    assert crash["t"] - killed_at < 1.0, "within about one interval (0.2 s) of the death"
    assert crash["pid"] == s.pid and crash["generation"] == s.events("master_start")[0][
        "generation"]
    for pid in orphans:  # they notice their parent changed, finish, and exit on their own
        s.wait_exit(pid)
    exits = s.events("worker_exit")
    assert sorted(e["pid"] for e in exits) == sorted(orphans), "orphans keep their own exit"
    assert all(e["in_pid"] == e["pid"] for e in exits)
    check_record(s.events())


def test_a_restart_counts_the_orphans_still_alive(server: Make) -> None:
    first = server(workers=2, interval=0.2, failed=0.5).start(wait_workers=2)
    first.wait_booted()
    orphans = [e["pid"] for e in first.events("worker_start")]
    first.signal(signal.SIGKILL)
    first.wait_exit()
    # The next master writes to the same record, so that one replay checks both.
    second = Server(first.directory, workers=1, state_file=first.state_file)
    try:
        second.start()
        restart = second.wait_count("master_start", 2)[-1]
        assert restart["reason"] == "restart" and restart["n_prev"] == 2
        crash = second.events("master_exit")[0]
        assert crash["reason"] == "crash", "the crash is told before the restart"
        assert second.events().index(crash) < second.events().index(restart)
        for pid in orphans:
            os.kill(pid, signal.SIGTERM)  # they finish their requests and exit
            second.wait_exit(pid)
        exits = second.wait_count("worker_exit", 2)
        assert sorted(e["pid"] for e in exits) == sorted(orphans)
        assert all(e["n_next"] is not None for e in exits), "after them: the restart's"
        second.stop()
        check_record(second.events())
    finally:
        second.kill_all()


FLAKY_APP = """
import os

if os.path.exists(os.environ["BROKEN_DEPLOY"]):
    raise ImportError("this deploy is broken")

from example_app.app import app
"""


def test_a_failed_upgrade_rolls_back_and_the_old_master_serves(server: Make,
                                                               tmp_path: Path) -> None:
    (tmp_path / "flaky_app.py").write_text(FLAKY_APP)
    broken = tmp_path / "broken"
    s = server(workers=2, interval=0.2, failed=0.5,
               settings=f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n")
    s.app = "flaky_app:app"
    s.start(wait_workers=2, env={"BROKEN_DEPLOY": str(broken)})
    s.wait_booted()
    broken.touch()  # the new code fails to import
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    while not s.events("master_exit", generation=upgrade["generation"]):
        assert s.request().startswith(b"HTTP/1.0 200"), "the old master serves throughout"
    rollback = s.events("master_exit", generation=upgrade["generation"])[0]
    assert rollback["reason"] == "rollback"
    # Gunicorn 24+ can die in its own halt (a second boot error raises HaltServer inside
    # stop()), skipping on_exit: then the old side closes the generation, still a rollback.
    died = f"master {upgrade['in_pid']} died without on_exit" in s.log_text()
    assert (rollback["in_pid"] != upgrade["in_pid"]) == died, s.log_tail(30)
    s.wait_exit(upgrade["in_pid"])
    (newest,) = read_status(s.state_file)["generations"]
    assert newest["master_pid"] == s.pid and newest["open"], "the old generation is newest"
    s.stop()
    check_record(s.events())


def test_a_new_master_killed_during_an_upgrade_rolls_back_within_an_interval(
    server: Make
) -> None:
    s = server(workers=2, interval=0.2, failed=0.5, settings="timeout = 2")
    s.start(wait_workers=2)
    s.wait_booted()
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.wait_count("worker_start", 2, generation=upgrade["generation"])
    killed_at = time.monotonic()
    os.kill(upgrade["in_pid"], signal.SIGKILL)  # no on_exit
    rollback = s.wait_count("master_exit", 1, generation=upgrade["generation"])[0]
    assert rollback["reason"] == "rollback" and rollback["t"] - killed_at < 1.0
    assert rollback["in_pid"] != upgrade["in_pid"]
    for e in s.events("worker_start", generation=upgrade["generation"]):
        s.wait_exit(e["pid"])  # the orphans of the new master exit on their own
    assert s.request().startswith(b"HTTP/1.0 200")
    wait_for(lambda: [g["master_pid"] for g in read_status(s.state_file)["generations"]] == [
        s.pid], "the old generation alone, newest again")
    s.stop()
    check_record(s.events())


CLASSES = {"sync": "example_app.app:app", "gthread": "example_app.app:app",
           "gevent": "example_app.app:app", "uvicorn_worker.UvicornWorker":
           "example_app.app:asgi_app"}
if gunicorn.version_info >= (27,):
    CLASSES["asgi"] = "example_app.app:asgi_app"


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_worker_aborted_for_its_timeout_is_lost_for_timeout(server: Make,
                                                              worker_class: str) -> None:
    # A worker that cannot even run its abort handler (stopped): Gunicorn aborts it, then
    # kills it, and its master names the timeout.
    # timeout 2: UvicornWorker tells Gunicorn it lives every timeout/2 + 0.1 s, which a
    # timeout of 1 s can miss in a healthy worker.
    s = server(workers=2, interval=30.0, settings=f"worker_class = {worker_class!r}\n"
               "timeout = 2")
    s.app = CLASSES[worker_class]
    s.start(wait_workers=2)
    s.wait_settled()
    victim = s.events("worker_start")[0]["pid"]
    if "uvicorn" in worker_class:  # booted, but Gunicorn watches it only once its loop runs
        wait_for(lambda: f"Started server process [{victim}]" in s.log_text(),
                 "the victim's uvicorn server started")
    os.kill(victim, signal.SIGSTOP)
    lost = s.wait_count("worker_lost", 1, timeout=20)[0]
    assert (lost["pid"], lost["reason"], lost["in_pid"]) == (victim, "timeout", s.pid)
    s.wait_count("worker_start", 3)
    s.stop()
    assert not s.events("worker_exit", pid=victim)
    check_record(s.events())


def test_a_worker_that_runs_its_abort_handler_tells_its_own_timeout(server: Make) -> None:
    s = server(workers=2, interval=30.0, settings="timeout = 1").start(wait_workers=2)
    s.wait_booted()
    s.request("/spin?seconds=10")  # the request is cut short: Gunicorn aborts the worker
    lost = s.wait_count("worker_lost", 1, timeout=20)[0]
    assert lost["reason"] == "timeout" and lost["in_pid"] == lost["pid"], "told by itself"
    s.wait_count("worker_start", 3)
    s.stop()
    check_record(s.events())
