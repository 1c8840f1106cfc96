"""One leader worker per state file, with failover and a fencing term (SPEC section 10), on
real Gunicorn masters and workers driven by real signals."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from gunicorn_lifecycle.status import read_status
from harness import Server, alive, check_record, cli, wait_for

Make = Callable[..., Server]
SLACK = 1.0  # a loaded 2-core machine's scheduling, on top of each bound
NO_TIMEOUT = "timeout = 300"  # Gunicorn's own timeout never kills a worker these tests stop


def check_leaders(events: list[dict[str, Any]], vanished: Collection[int] = ()) -> None:
    """Replay the record (written in turn, so in delivery order): each term started once, terms
    growing; a leader_stop only by the current leader of its term, and no leader_start while
    another leader runs, unless that one ``vanished`` (killed, or stopped past the bound);
    every leader that exits stops leading before its worker_exit."""
    leading: dict[int, int] = {}  # pid -> its term, from its leader_start to its leader_stop
    last_term = 0
    for n, e in enumerate(events):
        where = f"event #{n} {e}"
        if e["cb"] == "leader_start":
            assert e["term"] > last_term, f"{where}: a term started twice, or out of order"
            last_term = e["term"]
            others = set(leading) - set(vanished)
            assert not others, f"{where}: {others} still lead"
            assert e["in_pid"] == e["pid"] and e["reason"] == "elected", where
            leading[e["pid"]] = e["term"]
        elif e["cb"] == "leader_stop":
            assert leading.pop(e["in_pid"], None) == e["term"], f"{where}: not its term"
            assert e["reason"] in ("exit", "lost"), where
        elif e["cb"] == "worker_exit":
            assert e["pid"] not in leading, f"{where}: exits while it leads"


def leader(s: Server) -> dict[str, int] | None:
    """The leader the state names: its pid and term."""
    return next((g["leader"] for g in read_status(s.state_file)["generations"] if g["leader"]),
                None)


def started(s: Server, term: int, timeout: float = 15.0) -> dict[str, Any]:
    """The leader_start of the first term after ``term``."""
    return s._wait(lambda: next((e for e in s.events("leader_start") if e["term"] > term),
                                None), f"a leader_start with a term after {term}", timeout)


def with_leader(server: Make, workers: int, **options: Any) -> tuple[Server, dict[str, Any]]:
    """A started, settled instance that records leader events, and its first leader_start."""
    s = server(workers=workers, leader=True, **options).start(wait_workers=workers)
    s.wait_settled()
    (first,) = s.events("leader_start")
    return s, first


def replaced_while_stopped(s: Server, first: dict[str, Any], interval: float, failed: float
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """SIGSTOP the leader ``first``: its successor's leader_start within the bound; then
    SIGCONT: its leader_stop("lost"). Both events."""
    stopped = time.monotonic()
    os.kill(first["pid"], signal.SIGSTOP)
    try:
        second = started(s, first["term"])
        took = second["t"] - stopped
        # Found late once its stamp is interval + failed old, by the next sweep (one interval),
        # elected there; the new leader learns it at its next beat (one interval at most).
        assert took <= interval + failed + 2 * interval + SLACK, f"replaced after {took:.2f}s"
        assert not s.events("leader_stop", in_pid=first["pid"]), "a stopped leader runs nothing"
    finally:
        os.kill(first["pid"], signal.SIGCONT)
    (stop,) = s.wait_count("leader_stop", 1)
    assert (stop["in_pid"], stop["term"], stop["reason"]) == (first["pid"], first["term"], "lost")
    return second, stop


def test_one_leader_after_start_then_kill_9_and_term(server: Make) -> None:
    s, first = with_leader(server, 3, interval=0.5, failed=0.5)
    workers = {e["pid"] for e in s.events("worker_start")}
    assert first["in_pid"] in workers and first["in_main"], "in post_worker_init of its worker"
    assert leader(s) == {"pid": first["pid"], "term": first["term"]}
    assert abs(first["term"] - time.time_ns() // 10**6) < 60_000, "a new file: the clock, in ms"
    ids = {e["id"]: e for e in s.events("worker_start")}
    assert first["id"] in ids and first["generation"] == ids[first["id"]]["generation"]

    killed = time.monotonic()
    os.kill(first["pid"], signal.SIGKILL)  # reaped by its master: replaced within an interval
    second = started(s, first["term"])
    took = second["t"] - killed
    assert second["term"] == first["term"] + 1
    assert second["pid"] != first["pid"] and not second["in_main"]
    assert took <= 0.5 + SLACK, f"the reaped leader was replaced after {took:.2f}s"
    wait_for(lambda: leader(s) == {"pid": second["pid"], "term": second["term"]},
             "status to show the new term")

    s.stop()
    check_leaders(s.events(), vanished={first["pid"]})
    check_record(s.events())
    stop = s.events("leader_stop", in_pid=second["pid"])
    assert [e["reason"] for e in stop] == ["exit"], stop
    assert s.events().index(stop[0]) < s.events().index(
        s.events("worker_exit", pid=second["pid"])[0]), "leader_stop before its worker_exit"
    assert leader(s) is None


def test_a_stopped_leader_is_replaced_and_stops_leading_when_continued(server: Make) -> None:
    interval, failed = 0.2, 0.4
    s, first = with_leader(server, 3, interval=interval, failed=failed, settings=NO_TIMEOUT)
    second, stop = replaced_while_stopped(s, first, interval, failed)
    assert second["pid"] != first["pid"] and second["term"] == first["term"] + 1
    assert not stop["in_main"], "found at its next beat, outside the main thread"
    resumed = s.wait_count("worker_start", 1, reason="resume")[0]
    assert s.events().index(stop) < s.events().index(resumed), "it stops leading first"
    assert leader(s) == {"pid": second["pid"], "term": second["term"]}
    s.stop()
    check_leaders(s.events(), vanished={first["pid"]})
    check_record(s.events())


def test_hup_hands_leadership_to_the_new_generation_without_overlap(server: Make) -> None:
    interval = 0.3
    s, first = with_leader(server, 2, interval=interval, failed=0.5)
    for hup in range(1, 3):
        s.signal(signal.SIGHUP)
        new = s.wait_count("master_start", hup + 1)[-1]["generation"]
        s.wait_count("master_ready", 1, generation=new)
        after = started(s, first["term"] + hup - 1)
        assert after["generation"] == new, after
        stop = s.events("leader_stop", term=after["term"] - 1)
        assert [e["reason"] for e in stop] == ["exit"], stop
        gap = after["t"] - stop[0]["t"]
        # At once (one beat) if a worker of the new generation had booted when the old leader
        # exited; else the first one to boot leads from its own post_worker_init.
        assert after["in_main"] or gap <= interval + SLACK, f"a gap of {gap:.2f}s"
        assert gap >= 0, "no overlap"
        s.wait_booted(workers=2)
    s.stop()
    check_leaders(s.events())
    check_record(s.events())


def test_upgrade_hands_leadership_to_the_new_master(server: Make) -> None:
    interval = 0.3
    s, first = with_leader(server, 2, interval=interval, failed=0.5)
    done = cli("upgrade", "--state", s.state_file, "--timeout", "60")
    assert done.returncode == 0, done.stderr
    new_master = next(g for g in read_status(s.state_file)["generations"] if g["open"])
    assert new_master["master_pid"] != s.pid
    after = started(s, first["term"])
    (stop,) = s.events("leader_stop")
    assert (stop["in_pid"], stop["reason"]) == (first["pid"], "exit")
    assert after["generation"] == new_master["generation"] and after["term"] == first["term"] + 1
    gap = after["t"] - stop["t"]
    assert 0 <= gap <= interval + SLACK, f"the new generation was ready: a gap of {gap:.2f}s"
    check_leaders(s.events())
    os.kill(new_master["master_pid"], signal.SIGTERM)
    s.wait_exit(new_master["master_pid"])
    check_leaders(s.events())
    check_record(s.events())


def test_hammer_never_two_leader_starts_for_one_term(server: Make) -> None:
    """Many workers racing to elect (the master's reaps, every worker's sweeps and boots) while
    leaders and other workers are killed or frozen at random."""
    s = server(workers=8, leader=True, interval=0.02, failed=0.1,
               settings=NO_TIMEOUT).start(wait_workers=8)
    s.wait_settled()
    rng = random.Random(15)
    vanished: set[int] = set()
    term = s.wait_count("leader_start", 1)[-1]["term"]
    deadline = time.monotonic() + 12
    elections = 0
    while time.monotonic() < deadline:
        current = s.events("leader_start")[-1]
        victims = s.live_workers(s.pid)
        choice = rng.random()
        if choice < 0.6 or not victims:
            target, how = current["pid"], signal.SIGKILL
        elif choice < 0.8:
            target, how = rng.choice(victims), signal.SIGKILL
        else:
            target, how = rng.choice([current["pid"], *victims]), signal.SIGSTOP
        vanished.add(target)
        with contextlib.suppress(ProcessLookupError):  # reaped meanwhile
            os.kill(target, how)
            if how == signal.SIGSTOP:
                time.sleep(rng.uniform(0, 0.4))
                os.kill(target, signal.SIGCONT)
        if target == current["pid"] and how == signal.SIGKILL:
            term = started(s, term, timeout=10)["term"]
        elections = len(s.events("leader_start")) - 1
    starts = s.events("leader_start")
    terms = [e["term"] for e in starts]
    assert len(terms) == len(set(terms)), "two leader_start for one term"
    assert elections >= 60, f"only {elections} elections in 12s"
    wait_for(lambda: leader(s) is not None and alive(leader(s)["pid"]),  # type: ignore[index]
             "a live leader after the storm")
    check_leaders(s.events(), vanished=vanished)
    print(f"{elections} elections, {len(starts)} leader_start, last term {terms[-1]}")


def test_a_leader_stopped_inside_its_leader_start_is_passed_over(server: Make) -> None:
    """Stopped while its leader_start holds the node-wide turn: once a sweep finds it late, the
    turn is passed over as its leadership is, and the next leader starts within the bound."""
    interval, failed = 0.2, 0.4
    s = server(workers=3, leader=True, interval=interval, failed=failed, settings=NO_TIMEOUT,
               block={"leader_start": 3.0})
    s.start()  # not waiting for worker_start: the other workers' wait their turn
    (first,) = s.wait_count("leader_start", 1)  # recorded, then it blocks, holding the turn
    replaced_while_stopped(s, first, interval, failed)
    assert "holds the turn but is stopped" in s.log_text()
    s.stop()
    check_leaders(s.events(), vanished={first["pid"]})
    check_record(s.events())


def test_a_raising_leader_stop_still_lets_its_worker_exit(server: Make) -> None:
    s, first = with_leader(server, 2, on_error="raise", raising=("leader_stop",))
    os.kill(first["pid"], signal.SIGTERM)
    s.wait_count("worker_exit", 1, pid=first["pid"])
    assert [e["reason"] for e in s.events("leader_stop")] == ["exit"]
    assert not s.events("worker_lost"), "its exit completed: it is not lost"
    wait_for(lambda: "callback leader_stop raised on purpose" in s.log_text(),
             "the callback's error to reach Gunicorn (logged once the exit completed)")
    started(s, first["term"])
    s.stop()
    check_leaders(s.events())
    check_record(s.events())


def test_a_worker_gunicorn_stops_is_never_elected(server: Make) -> None:
    """A worker finishing its last request after Gunicorn told it to stop withdraws at its
    next beat: when the leader dies meanwhile, no term goes to it."""
    s, first = with_leader(server, 2, interval=0.2, failed=0.5)
    other = next(p for p in s.live_workers(s.pid) if p != first["pid"])
    busy = [threading.Thread(target=s.request, args=("/sleep?seconds=3",)) for _ in range(2)]
    for thread in busy:  # both workers busy: each holds one request
        thread.start()
    time.sleep(0.2)  # the requests' arrival (not a wait for a condition of the plugin)
    os.kill(other, signal.SIGTERM)
    wait_for(lambda: not any(w["booted"] for g in read_status(s.state_file)["generations"]
                             for w in g["workers"] if w["pid"] == other),
             "the stopping worker to withdraw")
    os.kill(first["pid"], signal.SIGKILL)
    second = started(s, first["term"])
    assert second["pid"] not in (other, first["pid"])
    assert second["term"] == first["term"] + 1, "no term went to the stopping worker"
    for thread in busy:
        thread.join()
    s.stop()
    check_leaders(s.events(), vanished={first["pid"]})


def test_a_slow_holder_of_the_turn_keeps_it(server: Make) -> None:
    """A callback that holds the GIL past interval + failed (a C extension's long call) makes
    its worker late, even lost, but not stopped: nobody else's callback runs meanwhile."""
    s = server(workers=3, leader=True, interval=0.2, failed=0.3, settings=NO_TIMEOUT,
               hold={"worker_start": 1.5})
    s.start()
    holder = s.wait_count("worker_start", 1)[0]
    s.wait_count("worker_start", 3, timeout=30)
    s.wait_settled()
    held = float(wait_for(lambda: Path(f"{s.record}.held.worker_start").read_text(),
                          "the GIL held and let go"))
    assert held - holder["t"] > 0.5 + 0.3, "it held the GIL past interval + failed"
    later = s.events()[s.events().index(holder) + 1:]
    assert later and all(e["t"] >= held for e in later), "no callback ran meanwhile"
    assert "holds the turn but is stopped" not in s.log_text()
    s.stop()
    check_leaders(s.events())
    check_record(s.events())


def test_a_killed_leader_is_replaced_within_a_second_at_any_interval(server: Make) -> None:
    """Its master reaps it; the successor's heartbeat is woken for its election, so its
    leader_start does not wait for its next beat (ten seconds here)."""
    s, first = with_leader(server, 3, interval=10.0, failed=5.0)
    killed = time.monotonic()
    os.kill(first["pid"], signal.SIGKILL)
    second = started(s, first["term"])
    assert second["t"] - killed < 1.0 + SLACK, f"replaced after {second['t'] - killed:.2f}s"
    s.stop()
    check_leaders(s.events(), vanished={first["pid"]})


def test_leadership_moves_within_a_second_of_leader_stop_across_a_reload(server: Make) -> None:
    s, first = with_leader(server, 2, interval=10.0, failed=5.0)
    s.signal(signal.SIGHUP)  # the old workers stop once the new generation's have booted
    (stop,) = s.wait_count("leader_stop", 1, timeout=30)
    second = started(s, first["term"], timeout=30)
    assert stop["reason"] == "exit" and second["t"] - stop["t"] < 1.0 + SLACK, (stop, second)
    assert second["generation"] > first["generation"], "the newest ready generation leads"
    s.stop()
    check_leaders(s.events())
    check_record(s.events())
