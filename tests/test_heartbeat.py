"""A healthy worker is never reported lost (SPEC section 5): many workers beating fast,
a worker busy holding the GIL, a worker waiting its turn to exit."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from harness import Server, check_record, wait_for

Make = Callable[..., Server]


def test_64_workers_beating_every_10_ms_for_a_minute(server: Make) -> None:
    s = server(workers=64, interval=0.01, failed=5.0, settings="timeout = 0")
    s.start(wait_workers=64)
    s.wait_booted(workers=64)
    until = time.monotonic() + 60.0
    while time.monotonic() < until:  # requests now and then, across the minute
        assert s.request().startswith(b"HTTP/1.0 200")
        assert not s.events("worker_lost"), s.events("worker_lost")
        time.sleep(1.0)  # the pace of the requests, not a wait for anything
    s.stop()
    assert not s.events("worker_lost")
    assert len(s.events("worker_exit")) == 64
    check_record(s.events())


def test_a_worker_holding_the_gil_for_ten_overruns(server: Make) -> None:
    s = server(workers=2, interval=0.1, failed=0.2, settings="timeout = 0").start(wait_workers=2)
    s.wait_booted()
    assert s.request("/spin?seconds=3").startswith(b"HTTP/1.0 200")
    s.stop()
    assert not s.events("worker_lost")
    check_record(s.events())


def test_workers_waiting_their_turn_to_exit_are_not_lost(server: Make) -> None:
    # A reload: old workers exit one by one, each waiting for the others' slow worker_exit
    # callbacks for longer than interval + failed.
    s = server(workers=4, interval=0.2, failed=0.3, block={"worker_exit": 1.0})
    s.start(wait_workers=4)
    s.wait_booted()
    s.signal(signal.SIGHUP)
    wait_for(lambda: s.events("master_exit"), "the old generation closed", timeout=30)
    s.stop()
    assert not s.events("worker_lost"), s.events("worker_lost")
    check_record(s.events())
