"""The lifecycle on real Gunicorn processes, driven by real signals (SPEC sections 3-5)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from gunicorn_lifecycle.status import read_status
from harness import Server, alive, check_record, wait_for

Make = Callable[..., Server]


def only(events: list[dict[str, object]]) -> dict[str, object]:
    assert len(events) == 1, events
    return events[0]


def registered_pids(state_file: str) -> set[int]:
    """The workers the state counts as registered (not lost)."""
    return {w["pid"] for g in read_status(state_file)["generations"] for w in g["workers"]
            if not w["lost"]}


def open_generations(state_file: str) -> list[int]:
    """The generations in use, by number: open, or closed and still referred to."""
    return [g["generation"] for g in read_status(state_file)["generations"]]


def test_cold_start_then_term(server: Make) -> None:
    s = server(workers=3).start(wait_workers=3)
    s.stop()

    start = only(s.events("master_start"))
    assert start["reason"] == "start" and start["in_pid"] == start["pid"] == s.pid
    assert (start["n_prev"], start["n_mine"], start["n_next"]) == (None, 0, None)
    g = start["generation"]
    starts = s.events("worker_start")
    assert [e["n_mine"] for e in starts] == [1, 2, 3]
    assert all(e["in_pid"] == e["pid"] != s.pid and e["reason"] == "spawn" for e in starts)
    assert all(e["id"] == f"{g}-{e['pid']}" and e["has_worker"] for e in starts)
    exits = s.events("worker_exit")
    assert [e["n_mine"] for e in exits] == [3, 2, 1]
    assert all(e["in_pid"] == e["pid"] and e["reason"] == "exit" for e in exits)
    assert {e["pid"] for e in exits} == {e["pid"] for e in starts}
    stop = only(s.events("master_exit"))
    assert stop["reason"] == "stop" and stop["in_pid"] == s.pid and stop["n_mine"] == 0
    assert s.events()[0] == start and s.events()[-1] == stop
    assert not s.events("worker_lost")
    check_record(s.events())
    assert open_generations(s.state_file) == []


def test_hup_reload(server: Make) -> None:
    s = server(workers=2).start(wait_workers=2)
    old = only(s.events("master_start"))["generation"]
    s.signal(signal.SIGHUP)
    reload_exit = s.wait_count("master_exit", 1)[0]

    reload_start = only(s.events("master_start", reason="reload"))
    new = reload_start["generation"]
    assert new > old and reload_start["in_pid"] == s.pid and reload_start["n_prev"] == 2
    assert reload_exit["reason"] == "reload" and reload_exit["generation"] == old
    assert reload_exit["in_pid"] == s.pid and reload_exit["n_next"] is not None
    old_exits = s.events("worker_exit", generation=old)
    assert len(old_exits) == 2 and all(e["n_next"] is not None for e in old_exits)
    s.wait_count("worker_start", 2, generation=new)
    assert s.request().startswith(b"HTTP/1.0 200")
    s.stop()
    assert only(s.events("master_exit", generation=new))["reason"] == "stop"
    check_record(s.events())


def test_usr2_upgrade_then_old_master_stops(server: Make) -> None:
    s = server(workers=2).start(wait_workers=2)
    old = only(s.events("master_start"))["generation"]
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    new_master = upgrade["in_pid"]
    assert new_master not in (s.pid, None) and upgrade["n_prev"] == 2
    new_starts = s.wait_count("worker_start", 2, generation=upgrade["generation"])
    assert all(e["n_prev"] == 2 for e in new_starts)

    s.signal(signal.SIGTERM)
    s.wait_exit()
    old_exit = only(s.events("master_exit", generation=old))
    assert old_exit["reason"] == "upgrade" and old_exit["in_pid"] == s.pid
    assert old_exit["n_next"] == 2
    assert [e["n_next"] for e in s.events("worker_exit", generation=old)] == [2, 2]

    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    new_exit = only(s.events("master_exit", generation=upgrade["generation"]))
    assert new_exit["reason"] == "stop" and new_exit["in_pid"] == new_master
    assert new_exit["n_prev"] is None
    check_record(s.events())


def test_usr2_then_new_master_stops_is_a_rollback(server: Make) -> None:
    s = server(workers=2).start(wait_workers=2)
    old = only(s.events("master_start"))["generation"]
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    new = upgrade["generation"]
    s.wait_count("worker_start", 2, generation=new)

    s.signal(signal.SIGTERM, upgrade["in_pid"])
    rollback = s.wait_count("master_exit", 1, generation=new)[0]
    assert rollback["reason"] == "rollback" and rollback["in_pid"] == upgrade["in_pid"]
    assert rollback["n_prev"] == 2 and rollback["n_next"] is None
    assert [e["n_prev"] for e in s.events("worker_exit", generation=new)] == [2, 2]

    assert s.request().startswith(b"HTTP/1.0 200")
    s.signal(signal.SIGTTIN)
    third = s.wait_count("worker_start", 3, generation=old)[-1]
    assert third["n_next"] is None and third["n_mine"] == 3
    s.stop()
    assert only(s.events("master_exit", generation=old))["reason"] == "stop"
    check_record(s.events())


def test_killed_worker_is_lost_at_once_and_respawned(server: Make) -> None:
    s = server(workers=2, interval=30.0, failed=30.0).start(wait_workers=2)
    victim = s.events("worker_start")[0]["pid"]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    lost = s.wait_count("worker_lost", 1)[0]
    assert lost["t"] - killed_at < 1.0, "the master reaps a killed worker at once"
    assert lost["reason"] == "crash" and lost["pid"] == victim and lost["in_pid"] == s.pid
    assert lost["n_mine"] == 1 and lost["has_worker"]
    respawn = s.wait_count("worker_start", 3)[-1]
    assert respawn["reason"] == "respawn" and respawn["n_mine"] == 2
    s.stop()
    assert not s.events("worker_exit", pid=victim)
    check_record(s.events())


def test_killed_master_then_restart(server: Make) -> None:
    first = server(workers=2, settings="timeout = 2").start(wait_workers=2)
    dead_generation = only(first.events("master_start"))["generation"]
    workers = [e["pid"] for e in first.events("worker_start")]
    first.signal(signal.SIGKILL)
    first.wait_exit()
    for pid in workers:  # orphans notice their parent changed, and exit
        first.wait_exit(pid)

    second = server(workers=2, state_file=first.state_file).start(wait_workers=2)
    restart = only(second.events("master_start"))
    assert restart["reason"] == "restart" and restart["generation"] > dead_generation
    assert restart["n_prev"] is None
    assert open_generations(first.state_file) == [restart["generation"]]
    assert "died without on_exit" in first.log_text() + second.log_text()
    second.stop()
    check_record(second.events())


def test_stopped_worker_is_lost_by_heartbeat_and_comes_back(server: Make) -> None:
    s = server(workers=2, interval=0.3, failed=0.3, settings="timeout = 0")
    s.start(wait_workers=2)
    s.wait_settled()
    victim = s.events("worker_start")[0]["pid"]
    try:
        stopped_at = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        lost = s.wait_count("worker_lost", 1)[0]
        assert lost["reason"] == "heartbeat" and lost["pid"] == victim
        assert lost["in_pid"] != victim and lost["n_mine"] == 1
        assert lost["t"] - stopped_at < 0.3 + 0.3 + 0.3 + 0.5  # interval + failed + interval
        assert victim not in registered_pids(s.state_file)
    finally:
        os.kill(victim, signal.SIGCONT)
    resume = s.wait_count("worker_start", 1, pid=victim, reason="resume")[0]
    assert resume["in_pid"] == victim and resume["n_mine"] == 2, "announced, counted again"
    assert victim in registered_pids(s.state_file) and "registered again" in s.log_text()
    assert alive(victim)
    s.stop()
    # Then again exactly one end: its own exit.
    assert len(s.events("worker_lost", pid=victim)) == 1
    assert len(s.events("worker_exit", pid=victim)) == 1
    assert [e["n_mine"] for e in s.events("worker_exit")] == [2, 1]
    check_record(s.events())


def test_ttin_ttou_and_max_requests_keep_counts(server: Make) -> None:
    s = server(workers=2, settings="max_requests = 3").start(wait_workers=2)
    s.signal(signal.SIGTTIN)
    assert s.wait_count("worker_start", 3)[-1]["n_mine"] == 3
    s.signal(signal.SIGTTOU)
    s.wait_count("worker_exit", 1)
    wait_for(lambda: len(s.live_workers(s.pid)) == 2, "two workers after TTOU")
    for _ in range(20):
        assert s.request().startswith(b"HTTP/1.0 200")
    respawns = s.wait_count("worker_start", 4, reason="respawn")
    assert all(e["reason"] == "respawn" for e in respawns)
    s.stop()
    events = s.events()
    assert len(s.events("worker_start")) == len(s.events("worker_exit")) + len(
        s.events("worker_lost"))
    check_record(events)


def test_raising_callback_is_logged_and_the_server_serves(server: Make) -> None:
    s = server(workers=2, raising=("worker_start", "master_start")).start(wait_workers=2)
    assert s.request().startswith(b"HTTP/1.0 200")
    s.signal(signal.SIGTTIN)
    s.wait_count("worker_start", 3)
    s.stop()
    log = s.log_text()
    assert "the worker_start callback _record.<locals>.callback raised" in log
    assert "Traceback" in log
    assert "callback master_start raised on purpose" in log
    check_record(s.events())


def test_raising_callback_reaches_gunicorn_with_on_error_raise(server: Make) -> None:
    s = server(workers=1, raising=("master_start",), on_error="raise").start()
    s.wait_exit()
    assert s.proc is not None and s.proc.returncode != 0
    assert "callback master_start raised on purpose" in s.log_text()
    assert not s.events("worker_start")


def test_default_state_path_is_shared_across_usr2(server: Make) -> None:
    s = server(workers=1, state_file=None).start(wait_workers=1)
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    assert upgrade["n_prev"] == 1
    s.wait_count("worker_start", 1, generation=upgrade["generation"])
    paths = [line.split("state file ")[1] for line in s.log_text().splitlines()
             if "gunicorn_lifecycle: state file " in line]
    assert len(paths) == 2 and paths[0] == paths[1], paths
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_exit(upgrade["in_pid"])
    s.stop()
    check_record(s.events())
    os.unlink(paths[0])


def test_no_thread_in_the_master_and_no_delayed_exit(server: Make) -> None:
    # Gunicorn 25+'s control socket runs a thread of its own in the master (restarted around
    # each fork): off here, so that any other thread would be ours.
    s = server(workers=2, interval=60.0, settings="control_socket_disable = True")
    s.start(wait_workers=2)
    assert s.request().startswith(b"HTTP/1.0 200")
    assert os.listdir(f"/proc/{s.pid}/task") == [str(s.pid)], "the master runs one thread"
    workers = [e["pid"] for e in s.events("worker_start")]
    assert all(len(os.listdir(f"/proc/{pid}/task")) == 2 for pid in workers), "one heartbeat"
    stopping = time.monotonic()
    s.stop()
    assert time.monotonic() - stopping < 5.0, "a 60 s heartbeat sleep must not hold the exit"
    check_record(s.events())


def test_a_worker_still_stuck_at_stop_is_lost_exactly_once(server: Make) -> None:
    s = server(workers=2, interval=30.0, settings="timeout = 0\ngraceful_timeout = 1")
    s.start(wait_workers=2)
    stuck = s.events("worker_start")[0]["pid"]
    os.kill(stuck, signal.SIGSTOP)  # it cannot exit: Gunicorn SIGKILLs it after graceful_timeout
    s.stop()
    lost = only(s.events("worker_lost"))
    assert lost["pid"] == stuck and lost["reason"] == "crash" and lost["in_pid"] == s.pid
    assert only(s.events("master_exit"))["reason"] == "stop"
    check_record(s.events())


def test_rollback_after_the_new_master_reloaded(server: Make) -> None:
    s = server(workers=1).start(wait_workers=1)
    s.signal(signal.SIGUSR2)
    new_master = s.wait_count("master_start", 1, reason="upgrade")[0]["in_pid"]
    s.signal(signal.SIGHUP, new_master)
    reloaded = s.wait_count("master_start", 1, reason="reload")[0]
    s.wait_count("master_exit", 1, reason="reload")
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    last = only(s.events("master_exit", generation=reloaded["generation"]))
    assert last["reason"] == "rollback" and last["n_prev"] == 1
    s.stop()
    check_record(s.events())
