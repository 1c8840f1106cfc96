"""How the hooks meet Gunicorn: wiring mistakes, odd hook calls, state ownership, make run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from gunicorn_lifecycle import layout
from gunicorn_lifecycle.statefile import default_path
from gunicorn_lifecycle.status import read_status
from harness import HOOKS, REPO, Server, booted, check_record, wait_for

Make = Callable[..., Server]

STEAL_THE_REAP = '''
def nworkers_changed(server, new_value, old_value):
    """On TTOU, make the worker Gunicorn is about to signal vanish before it does."""
    import os, signal
    gunicorn_lifecycle.nworkers_changed(server, new_value, old_value)  # ours first, as README says
    if old_value is not None and new_value < old_value:
        oldest = min(server.WORKERS.values(), key=lambda w: w.age)
        os.kill(oldest.pid, signal.SIGKILL)
        os.waitpid(oldest.pid, 0)
'''


def test_worker_exit_called_in_the_master_is_not_the_workers_exit(server: Make) -> None:
    s = server(workers=2, settings=STEAL_THE_REAP, interval=30.0,
               hooks=tuple(h for h in HOOKS if h != "nworkers_changed")).start(wait_workers=2)
    oldest = s.events("worker_start")[0]["pid"]
    s.signal(signal.SIGTTOU)
    lost = s.wait_count("worker_lost", 1)[0]
    assert lost["pid"] == oldest and lost["in_pid"] == s.pid and lost["reason"] == "crash"
    s.stop()
    assert not s.events("worker_exit", pid=oldest)
    check_record(s.events())


def test_post_worker_init_marks_workers_booted(server: Make) -> None:
    s = server(workers=2).start(wait_workers=2)

    def booted() -> set[int]:
        return {w["pid"] for g in read_status(s.state_file)["generations"]
                for w in g["workers"] if w["booted"]}

    pids = {e["pid"] for e in s.events("worker_start")}
    wait_for(lambda: booted() == pids, f"workers {pids} marked booted")
    s.stop()


def test_a_hook_left_unwired_is_named_in_the_log(server: Make) -> None:
    s = server(workers=1, hooks=tuple(h for h in HOOKS if h != "child_exit"))
    s.start(wait_workers=1)
    wait_for(lambda: "the child_exit hook is not wired" in s.log_text(), "the wiring error")
    s.stop()


def test_post_fork_without_on_starting_is_named_in_the_log(server: Make) -> None:
    s = server(workers=1, hooks=tuple(h for h in HOOKS if h != "on_starting")).start()
    wait_for(lambda: "wire `on_starting = gunicorn_lifecycle.on_starting`" in s.log_text(),
             "the missing on_starting error")
    assert s.request().startswith(b"HTTP/1.0 200")
    s.stop()
    assert s.events() == []


def test_reload_without_on_reload_is_named_in_the_log(server: Make) -> None:
    s = server(workers=1, hooks=tuple(h for h in HOOKS if h != "on_reload"))
    s.start(wait_workers=1)
    s.signal(signal.SIGHUP)
    wait_for(lambda: "wire `on_reload = gunicorn_lifecycle.on_reload`" in s.log_text(),
             "the missing on_reload error")
    s.stop()


def test_a_second_instance_on_the_same_state_file_is_refused(server: Make) -> None:
    first = server(workers=1).start(wait_workers=1)
    assert first.request().startswith(b"HTTP/1.0 200")  # booted: its slot is settled
    before = _snapshot(first.state_file)
    second = server(workers=1, state_file=first.state_file).start()
    second.wait_exit()
    assert second.proc is not None and second.proc.returncode != 0
    assert f"in use by the live Gunicorn master {first.pid}" in second.log_text()
    assert _snapshot(first.state_file) == before
    assert first.request().startswith(b"HTTP/1.0 200")
    first.stop()
    check_record(first.events())


def test_state_file_is_private_and_printed_at_start(server: Make) -> None:
    s = server(workers=1).start(wait_workers=1)
    assert os.stat(s.state_file).st_mode & 0o777 == 0o600
    assert f"state file {s.state_file}" in s.log_text()
    assert len(Path(s.state_file).read_bytes()) == layout.file_size(256)
    assert not os.path.exists(s.state_file + ".lock"), "the lock is on the state file itself"
    s.stop()


def test_make_run_serves_logs_events_and_stops_on_term(tmp_path: Path) -> None:
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        make = subprocess.Popen(["make", "--no-print-directory", "run", f"VENV={sys.prefix}"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        body = wait_for(lambda: _get("http://127.0.0.1:8000/"), "make run to serve on :8000", 60)
        assert body.startswith(b"hello from worker")
        wait_for(lambda: "lifecycle worker_start" in log.read_text(), "worker_start in the log")
        assert "lifecycle master_start id=" in log.read_text()
        # Both workers of the example config up: a worker signalled earlier would miss it.
        wait_for(lambda: booted(default_path(["127.0.0.1:8000"]), 2), "two booted workers")
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(timeout=10)
        wait_for(lambda: "reason=stop" in log.read_text(), "master_exit(stop) in the log", 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)


def _snapshot(state_file: str) -> bytes:
    """The whole file but what moves on its own: stamps, the sweep deadline, who locked last
    and the lock's release word."""
    data = bytearray(Path(state_file).read_bytes())
    slots = layout.check_header(data, len(data), state_file)
    moving = [layout.H.NEXT_SWEEP, layout.H.HOLDER_PID, layout.H.HOLDER_WHAT,
              layout.H.RELEASES]
    for at in [*moving, *(layout.slot_at(i) + layout.S.HEARTBEAT for i in range(slots))]:
        data[at * 8 : at * 8 + 8] = bytes(8)
    return bytes(data)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bytes(response.read())
    except OSError:
        return None


def test_two_configure_calls_in_one_config_stop_gunicorn_naming_both(server: Make,
                                                                      tmp_path: Path) -> None:
    helper = tmp_path / "lifecycle_helpers.py"  # a module of the user's, imported by the config
    helper.write_text("import gunicorn_lifecycle\n"
                      "gunicorn_lifecycle.configure(worker_lost=print)\n")
    s = server(workers=1, settings=f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
               "import lifecycle_helpers\n")
    s.start()
    s.wait_exit()
    assert s.proc is not None and s.proc.returncode != 0
    log = s.log_text()
    assert "configure() was called twice while one config was loaded" in log
    assert f"{s.conf}:" in log and f"{helper}:2" in log and "pass a list" in log
    assert not s.events()


def test_a_relative_state_file_survives_chdir_usr2_and_hup(server: Make, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    s = server(workers=1, state_file="relative.state", settings=f"chdir = {str(elsewhere)!r}")
    s.state_file = str(s.directory / "relative.state")  # beside the config file
    s.start(wait_workers=1)
    s.wait_booted()
    s.signal(signal.SIGHUP)
    s.wait_count("master_start", 1, reason="reload")
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    assert upgrade["n_prev"] == 1, "the new master found the old one's generation"
    assert "state_file changed on reload" not in s.log_text()
    assert os.path.exists(s.state_file) and not list(elsewhere.glob("*.state"))
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_exit(upgrade["in_pid"])
    s.stop()
    check_record(s.events())
