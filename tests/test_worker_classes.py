"""The lifecycle in every worker class: sync, gthread, gevent, Gunicorn's asgi, UvicornWorker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import gunicorn
import pytest
from states import registered
from test_leader import check_leaders

from harness import Server, check_record, wait_for

Make = Callable[..., Server]
WSGI, ASGI = "example_app.app:app", "example_app.app:asgi_app"
CLASSES = {
    "sync": WSGI,
    "gthread": WSGI,
    "gevent": WSGI,
    "asgi": ASGI,
    "uvicorn_worker.UvicornWorker": ASGI,
}
if gunicorn.version_info < (27,):
    # Gunicorn's own ASGI worker came in 25, but until 27 it never forgets a closed
    # connection: every stop waits out graceful_timeout, with or without this plugin.
    del CLASSES["asgi"]
BAD_DEATHS = ("SIGABRT", "SIGSEGV", "Fatal Python error", "Aborted", "core dumped")


def make(server: Make, worker_class: str, **kwargs: object) -> Server:
    settings = f"worker_class = {worker_class!r}\n" + str(kwargs.pop("settings", ""))
    s = server(settings=settings, **kwargs)
    s.app = CLASSES[worker_class]
    return s


def no_bad_deaths(s: Server) -> None:
    log = s.log_text()
    assert not [bad for bad in BAD_DEATHS if bad in log], log


@pytest.mark.parametrize("worker_class", CLASSES)
def test_start_reload_upgrade_crash_stop(server: Make, worker_class: str) -> None:
    s = make(server, worker_class, workers=2, leader=True).start(wait_workers=2)
    assert b" 200 OK" in s.request()
    s.signal(signal.SIGHUP)
    reload_start = s.wait_count("master_start", 1, reason="reload")[0]
    s.wait_count("master_exit", 1, reason="reload")
    s.wait_count("worker_start", 2, generation=reload_start["generation"])
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    new_master = upgrade["in_pid"]
    starts = s.wait_count("worker_start", 2, generation=upgrade["generation"])
    s.signal(signal.SIGTERM)
    s.wait_exit()
    assert s.events("master_exit", reason="upgrade")
    s.wait_count("leader_start", 1, generation=upgrade["generation"])
    victim = starts[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    s.wait_count("worker_lost", 1)
    s.wait_count("worker_start", 3, generation=upgrade["generation"])
    s.wait_booted()
    stopping = time.monotonic()
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    assert time.monotonic() - stopping < 5.0, "well under graceful_timeout (10 s)"
    assert [e["pid"] for e in s.events("worker_lost")] == [victim]
    assert [e["reason"] for e in s.events("master_exit")] == ["reload", "upgrade", "stop"]
    check_record(s.events())  # every other worker: exactly one worker_exit
    # A leader from the start, handed over to the upgrade's generation (and to the reload's,
    # if one of its workers noticed before the upgrade); every term started once, in order.
    leaders = {e["generation"] for e in s.events("leader_start")}
    assert {1, upgrade["generation"]} <= leaders, s.events("leader_start")
    check_leaders(s.events(), vanished={victim})
    no_bad_deaths(s)


@pytest.mark.parametrize("worker_class", CLASSES)
def test_heartbeat_neither_starved_nor_late_to_exit(server: Make, worker_class: str) -> None:
    s = make(server, worker_class, workers=2, interval=0.3, failed=0.3, settings="timeout = 0")
    s.start(wait_workers=2)
    s.wait_settled()
    busy_until = time.monotonic() + 3.0  # ten intervals of requests: no false loss
    while time.monotonic() < busy_until:
        assert b" 200 OK" in s.request()
    assert s.events("worker_lost") == []
    victim = s.events("worker_start")[0]["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        lost = s.wait_count("worker_lost", 1)[0]
        assert lost["pid"] == victim and lost["reason"] == "heartbeat"
    finally:
        os.kill(victim, signal.SIGCONT)

    wait_for(lambda: victim in registered(s.state_file), "the resumed worker to register again")
    stopping = time.monotonic()
    s.stop()
    assert time.monotonic() - stopping < 5.0, "well under graceful_timeout (10 s)"
    assert len(s.events("worker_lost")) == 1
    assert [e["reason"] for e in s.events("worker_start", pid=victim)] == ["spawn", "resume"]
    assert sorted(e["pid"] for e in s.events("worker_exit")) == sorted(
        {e["pid"] for e in s.events("worker_start")})
    check_record(s.events())
    no_bad_deaths(s)
