"""`gunicorn-lifecycle status` on real servers, and its handling of bad input."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn_lifecycle import layout
from gunicorn_lifecycle.status import read_status
from harness import Server, wait_for

Make = Callable[..., Server]


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gunicorn_lifecycle", "status", *args],
                          capture_output=True, text=True, timeout=30)


def status_json(*args: str) -> dict[str, Any]:
    done = status("--json", *args)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def workers_by_generation(report: dict[str, Any]) -> dict[int, set[int]]:
    return {g["generation"]: {w["pid"] for w in g["workers"]} for g in report["generations"]}


def test_usr2_overlap_lists_both_masters_and_all_workers(server: Make) -> None:
    s = server(workers=2, interval=0.3, failed=0.3).start(wait_workers=2)
    old = s.events("master_start")[0]["generation"]
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    new, new_master = upgrade["generation"], upgrade["in_pid"]
    s.wait_count("worker_start", 2, generation=new)

    report = status_json("--state", s.state_file)
    assert report["state_file"] == s.state_file
    masters = {g["generation"]: g["master_pid"] for g in report["generations"]}
    assert masters == {old: s.pid, new: new_master}
    expected = {g: {e["pid"] for e in s.events("worker_start", generation=g)} for g in (old, new)}
    assert workers_by_generation(report) == expected
    for gen in report["generations"]:
        assert gen["open"] and not gen["closing"] and gen["master_alive"]
        assert gen["reason"] == {old: "start", new: "upgrade"}[gen["generation"]]
        for w in gen["workers"]:
            assert w["id"] == f"{gen['generation']}-{w['pid']}"
            assert 0 <= w["heartbeat_age"] < 0.6 and not w["late"] and not w["lost"]

    s.signal(signal.SIGTERM)
    s.wait_exit()
    report = status_json("--state", s.state_file)
    assert [g["master_pid"] for g in report["generations"]] == [new_master]
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    assert status_json("--state", s.state_file)["generations"] == []


def test_a_stopped_worker_ages_and_is_flagged(server: Make) -> None:
    # One worker: nobody else beats, so nobody sweeps it away while we watch it age.
    s = server(workers=1, interval=0.2, failed=0.2, settings="timeout = 0")
    s.start(wait_workers=1)
    victim = s.events("worker_start")[0]["pid"]

    def age() -> tuple[float, bool]:
        (worker,) = read_status(s.state_file)["generations"][0]["workers"]
        assert worker["pid"] == victim
        return worker["heartbeat_age"], worker["late"]

    s.wait_settled()
    os.kill(victim, signal.SIGSTOP)
    try:
        first = wait_for(lambda: (a := age())[1] and a, "the stopped worker to be flagged late")
        second = wait_for(lambda: (a := age())[0] > first[0] + 0.2 and a, "its age to grow")
        assert second[1]
        text = status("--state", s.state_file)
        assert text.returncode == 0 and "LATE" in text.stdout and "1 late" in text.stdout
    finally:
        os.kill(victim, signal.SIGCONT)
    s.stop()


def test_config_file_resolves_the_same_path_as_the_hooks(server: Make) -> None:
    s = server(workers=1, state_file=None).start(wait_workers=1)
    logged = next(line.split("state file ")[1] for line in s.log_text().splitlines()
                  if "gunicorn_lifecycle: state file " in line)
    report = status_json("-c", str(s.conf))
    assert report["state_file"] == logged
    assert workers_by_generation(report) == {
        s.events("master_start")[0]["generation"]: {s.events("worker_start")[0]["pid"]}}
    text = status("-c", str(s.conf)).stdout
    assert f"state file: {logged}" in text and "total: 1 generations, 1 workers, 0 late" in text
    s.stop()
    os.unlink(logged)


def test_reader_never_sees_a_torn_record_while_workers_churn(server: Make) -> None:
    s = server(workers=4, settings="max_requests = 1", interval=0.05, failed=1.0)
    s.start(wait_workers=4)
    seen: set[int] = set()
    reads = 0
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            s.request()

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        while len(s.events("worker_start")) < 60:
            for gen in read_status(s.state_file)["generations"]:
                seen.update(w["pid"] for w in gen["workers"])
            reads += 1
    finally:
        stop.set()
        for client in clients:
            client.join()
    s.stop()
    started = {e["pid"] for e in s.events("worker_start")}
    assert reads > 100 and seen and seen <= started, seen - started


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.state"
    foreign.write_bytes(b"not a state file" * 100)
    before = foreign.read_bytes()
    directory = tmp_path / "dir.state"
    directory.mkdir()
    link = tmp_path / "link.state"
    link.symlink_to(foreign)
    cases = {
        ("--state", str(tmp_path / "missing.state")): "does not exist",
        ("--state", str(foreign)): "wrong magic",
        ("--state", str(directory)): "is a directory",
        ("--state", str(link)): "symbolic link",
        ("-c", str(tmp_path / "missing.conf.py")): "does not exist",
    }
    for args, message in cases.items():
        done = status(*args)
        assert done.returncode == 2, (args, done)
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
    assert foreign.read_bytes() == before


def test_a_fresh_file_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "fresh.state"
    path.write_bytes(layout.new_file(8))
    path.chmod(0o600)
    report = status_json("--state", str(path))
    assert (report["state_file"], report["unknown"], report["generations"]) == (str(path), [], [])
    assert all(n == 0 for tallies in report["seen"].values() for n in tallies.values())


def test_status_takes_no_lock(server: Make) -> None:
    s = server(workers=1).start(wait_workers=1)
    with open(s.state_file, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a server holding the lock, as long as it likes
        assert len(status_json("--state", s.state_file)["generations"]) == 1
    s.stop()


def test_console_script_with_a_config_in_the_current_directory(tmp_path: Path) -> None:
    state = tmp_path / "here.state"
    state.write_bytes(layout.new_file(8))
    state.chmod(0o600)
    (tmp_path / "gunicorn.conf.py").write_text(
        "import gunicorn_lifecycle\n"
        "gunicorn_lifecycle.configure(state_file='here.state')\n")  # relative to the config
    script = Path(sys.executable).parent / "gunicorn-lifecycle"
    done = subprocess.run([str(script), "status", "--json", "-c", "gunicorn.conf.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state_file"] == str(state)


def test_an_unreadable_file_is_a_one_line_error(tmp_path: Path) -> None:
    state = tmp_path / "locked-away.state"
    state.write_bytes(layout.new_file(8))
    state.chmod(0o000)
    done = subprocess.run(  # root without the capabilities that bypass file modes
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
         "gunicorn_lifecycle", "status", "--state", str(state)],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"gunicorn-lifecycle: state file {state} cannot be opened "
                                   "(Permission denied); fix its permissions or choose another "
                                   "state_file")
