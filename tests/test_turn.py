"""The turn under contention (SPEC section 6, "Locks, signals and threads"): first come,
first served, never given up while its holders make progress, and never in a window where a
new worker cannot hear its signals."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from states import header_word

from gunicorn_lifecycle.layout import H
from harness import CALLBACKS, HOOKS, Load, Server, check_record, wait_for

Make = Callable[..., Server]

# The user's own hooks around ours, as README shows: they record when each worker asked for
# the turn (its hook began), so that the order callbacks ran in can be checked against it.
ASKED = '''
import json as _json

def _asked(name):
    line = _json.dumps({"cb": name, "pid": os.getpid(), "t": time.monotonic()})
    fd = os.open(RECORD + ".asked", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\\n").encode())
    os.close(fd)

def post_worker_init(worker):
    _asked("worker_start")
    gunicorn_lifecycle.post_worker_init(worker)

def worker_exit(server, worker):
    if worker.pid == os.getpid():
        _asked("worker_exit")
    gunicorn_lifecycle.worker_exit(server, worker)
'''
OWN_HOOKS = tuple(h for h in HOOKS if h not in ("post_worker_init", "worker_exit"))


def asked(s: Server) -> dict[tuple[str, int], float]:
    import json

    lines = Path(str(s.record) + ".asked").read_text().splitlines()
    return {(a["cb"], a["pid"]): a["t"] for a in map(json.loads, lines)}


def waiting(s: Server) -> int:
    """Threads that hold or wait for the turn now."""
    return header_word(s.state_file, H.NEXT_TICKET) - header_word(s.state_file, H.SERVING)


def overtakes(events: list[dict[str, Any]], asks: dict[tuple[str, int], float],
              slack: float) -> list[str]:
    """Callbacks that ran before one asked for more than ``slack`` seconds earlier."""
    runs = sorted((e["t"], asks[e["cb"], e["pid"]], f"{e['cb']} of {e['pid']}") for e in events
                  if (e["cb"], e["pid"]) in asks and e["reason"] != "resume")
    found = []
    for n, (_, asked_at, name) in enumerate(runs):
        earlier = [other for ran, other_asked, other in runs[n + 1 :]
                   if other_asked < asked_at - slack]
        if earlier:
            found.append(f"{name} overtook {len(earlier)}, first {earlier[0]}")
    return found


def test_churn_serves_every_callback_in_the_order_asked(server: Make) -> None:
    # 16 workers replaced after every request, every callback 0.3 s: the turn is never free.
    s = server(workers=16, hooks=OWN_HOOKS, settings=ASKED + "max_requests = 1\n"
               "graceful_timeout = 60\n", sleep=dict.fromkeys(CALLBACKS, 0.3),
               interval=1.0, failed=2.0)
    s.start()
    s.wait_count("worker_start", 16, timeout=60)
    load = Load(s, clients=8)
    deadline = time.monotonic() + 40
    wait_for(lambda: time.monotonic() > deadline, "40 s of churn", timeout=60)
    load.stop()
    s.wait_booted()
    s.signal(signal.SIGTERM)
    s.wait_exit(timeout=120)
    log, events = s.log_text(), s.events()
    assert "gave up" not in log and "Traceback" not in log, s.log_tail(30)
    assert not s.events("worker_lost"), s.events("worker_lost")[:3]
    check_record(events)  # every worker: one start, one end; every count as replayed
    assert len(s.events("worker_start")) >= 40, "the workers churned"
    asks = asked(s)
    waits = [e["t"] - asks[e["cb"], e["pid"]] for e in events if (e["cb"], e["pid"]) in asks]
    assert not overtakes(events, asks, slack=0.25), (overtakes(events, asks, 0.25)[:5],
                                                      f"longest wait {max(waits):.1f}s")


def test_waiters_behind_holders_that_progress_never_give_up(server: Make) -> None:
    # Each waits longer than lock_timeout in all, but no holder holds it that long.
    s = server(workers=4, lock_timeout=1.0, sleep={"worker_start": 0.6, "worker_exit": 0.6})
    s.start(wait_workers=4)
    s.stop()
    log = s.log_text()
    assert "gave up" not in log and "Traceback" not in log, s.log_tail(30)
    assert not s.events("worker_lost")
    assert len(s.events("worker_start")) == len(s.events("worker_exit")) == 4
    check_record(s.events())


def test_a_worker_stopped_while_it_waits_to_start_stops_at_once(server: Make) -> None:
    s = server(workers=1, block={"master_ready": 4.0}, settings="graceful_timeout = 30\n")
    s.start(wait_workers=1)
    first = s.wait_count("master_ready", 1)[0]["in_pid"]  # holds the turn for 4 s from now
    s.signal(signal.SIGTTIN)
    wait_for(lambda: waiting(s) >= 2, "the new worker waiting for the turn to start")
    began = time.monotonic()
    s.signal(signal.SIGTERM)
    s.wait_exit(timeout=40)
    took = time.monotonic() - began
    assert took < 15, f"the stop took {took:.1f}s: a worker did not hear TERM"
    assert not s.events("worker_lost"), s.events("worker_lost")
    assert [e["pid"] for e in s.events("worker_start")] == [first], "the stopped one never ran"
    check_record(s.events())


def test_a_turn_holder_killed_is_passed_over(server: Make) -> None:
    s = server(workers=3, block={"master_ready": 30.0}, lock_timeout=60.0)
    s.start(wait_workers=3)
    holder = s.wait_count("master_ready", 1)[0]["in_pid"]
    os.kill(holder, signal.SIGKILL)  # in its callback, holding the turn
    s.signal(signal.SIGTTIN)  # a new worker starts: its worker_start needs the turn
    s.wait_count("worker_start", 4)
    s.stop()
    assert [e["pid"] for e in s.events("worker_lost")] == [holder]
    check_record(s.events())
