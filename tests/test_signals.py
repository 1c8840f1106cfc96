"""Signals, threads and monkey-patching as users run Gunicorn (SPEC section 6, "Locks,
signals and threads"): nothing masked, nothing nested, nothing waiting for itself."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Load, Server, check_record, wait_for

Make = Callable[..., Server]

A_THREAD_IN_THE_MASTER = """
def when_ready(server):
    # As prometheus_client.start_http_server does: a daemon thread in the master, for good.
    import threading, time
    threading.Thread(target=lambda: [time.sleep(0.01) for _ in iter(int, 1)], daemon=True).start()
"""


def blocked_signals(pid: int) -> dict[int, str]:
    """SigBlk of every thread of ``pid``."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as status:
            found[int(tid)] = next(line.split()[1] for line in status
                                   if line.startswith("SigBlk:"))
    return found


def test_no_signal_is_ever_blocked_for_callbacks_or_their_children(server: Make) -> None:
    s = server(workers=3, probe=True, interval=0.2, failed=0.3, settings="timeout = 0")
    s.start(wait_workers=3)
    s.wait_settled()
    victim = s.events("worker_start")[0]["pid"]
    os.kill(victim, signal.SIGSTOP)  # its loss is told by another worker's courier thread
    try:
        s.wait_count("worker_lost", 1)
    finally:
        os.kill(victim, signal.SIGCONT)
    s.wait_count("worker_start", 1, pid=victim, reason="resume")  # its heartbeat's courier
    for pid in [s.pid, *s.live_workers(s.pid)]:
        assert set(blocked_signals(pid).values()) == {"0000000000000000"}, pid
    s.stop()
    events = s.events()
    assert {e["cb"] for e in events} == {"master_start", "master_exit", "master_ready",
                                         "worker_start", "worker_exit", "worker_lost"}
    for e in events:
        assert e["sigblk"] == e["child_sigblk"] == "0000000000000000", e
    check_record(events)


@pytest.mark.parametrize("version", ["23.0.0", None], ids=["gunicorn-23", "installed"])
def test_a_thread_in_the_master_with_churn_under_load(server: Make, version: str | None) -> None:
    # Gunicorn 21-23 reap in their SIGCHLD handler, which the kernel may hand to the thread
    # while the main thread is inside one of our hooks: the reap must wait, not nest.
    s = server(workers=4, gunicorn=version, interval=0.1, failed=2.0,
               settings=A_THREAD_IN_THE_MASTER + "max_requests = 1\n")
    s.start(wait_workers=4)
    wait_for(lambda: len(os.listdir(f"/proc/{s.pid}/task")) >= 2, "the master's own thread")
    load = Load(s, clients=4, each=75).join()
    assert not load.failures, load.failures[:3]
    s.wait_booted(workers=4)  # no respawn in flight: a worker TERMed before its handlers misses it
    s.stop()
    log = s.log_text()
    if version:
        assert f"Starting gunicorn {version}" in log
    assert "gave up" not in log and "Traceback" not in log, s.log_tail(30)
    assert len(s.events("worker_start")) >= 300
    assert not s.events("worker_lost"), "each worker exits on its own, once"
    check_record(s.events())


GEVENT_FIRST = "from gevent import monkey\nmonkey.patch_all()"


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_a_config_that_patches_gevent_first(server: Make, worker_class: str) -> None:
    s = server(workers=2, first=GEVENT_FIRST, interval=0.3, failed=0.3,
               settings=f"worker_class = {worker_class!r}\ntimeout = 0")
    s.start(wait_workers=2)
    s.wait_booted()
    workers = [e["pid"] for e in s.events("worker_start")]
    for pid in workers:
        assert len(os.listdir(f"/proc/{pid}/task")) >= 2, "the heartbeat is an OS thread"
    # Ten overruns of computing without a yield: a greenlet heartbeat would starve.
    assert s.request("/spin?seconds=3").startswith(b"HTTP/1.0 200")
    assert not s.events("worker_lost")
    stopping = time.monotonic()
    s.stop()
    assert time.monotonic() - stopping < 5.0, "TERM is heard: well under graceful_timeout"
    assert sorted(e["pid"] for e in s.events("worker_exit")) == sorted(workers)
    assert not s.events("worker_lost")
    check_record(s.events())


def test_a_quick_shutdown_while_exits_wait_their_turn(server: Make) -> None:
    # TERM, then INT: Gunicorn's quick shutdown sends SIGQUIT, whose handler raises
    # SystemExit in workers waiting for the turn. Each still ends exactly once.
    s = server(workers=3, block={"worker_exit": 2.0}, interval=5.0).start(wait_workers=3)
    s.wait_booted()
    s.signal(signal.SIGTERM)
    wait_for(lambda: Path(f"{s.record}.worker_exit").exists(), "a worker_exit callback running")
    s.signal(signal.SIGINT)
    s.wait_exit()
    ends = s.events("worker_exit") + s.events("worker_lost")
    assert sorted(e["pid"] for e in ends) == sorted(e["pid"] for e in s.events("worker_start"))
    assert s.events("master_exit")[0]["reason"] == "stop"
    check_record(s.events())


SLOW_LOSS = """
import json, os, time
import gunicorn_lifecycle

def _line(name, event):
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps({"cb": name, "id": event.id, "in_pid": os.getpid()}) + "\\n").encode())
    os.close(fd)

def lost(event):
    _line("lost-begin", event)
    time.sleep(2.0)  # say, deregister the worker from a service registry
    _line("lost-end", event)

gunicorn_lifecycle.configure(worker_lost=lost, state_file=STATE, interval=0.2, failed=0.3)
"""


def test_a_worker_that_exits_finishes_what_its_courier_delivers(server: Make,
                                                                tmp_path: Path) -> None:
    state = str(tmp_path / "courier.state")
    s = server(workers=3, record=False, state_file=state, settings=f"STATE = {state!r}\n"
               + SLOW_LOSS + "timeout = 0\n")
    s.start()
    s.wait_booted(workers=3)
    victim = s.live_workers(s.pid)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        courier = s.wait_count("lost-begin", 1)[0]["in_pid"]
        os.kill(courier, signal.SIGTERM)  # the worker whose courier runs the callback exits
        s.wait_exit(courier)
        assert s.events("lost-end", in_pid=courier), "its exit waited for the delivery"
    finally:
        os.kill(victim, signal.SIGCONT)
    s.stop()
