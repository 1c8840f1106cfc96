"""Hostile and broken inputs, privilege drop, churn, pid reuse (on real Gunicorn)."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from states import add_generation, add_worker, fresh, header_word, state_of, write

from gunicorn_lifecycle import layout
from gunicorn_lifecycle.process import own_start_time, start_time
from gunicorn_lifecycle.status import read_status
from harness import REPO, Load, Server, check_record, wait_for

Make = Callable[..., Server]
NOBODY = pwd.getpwnam("nobody")


def valid_file() -> bytes:
    return layout.new_file(8)


def with_word(word: layout.H, value: int) -> bytes:
    buf = fresh(8)
    buf[word * 8 : word * 8 + 8] = value.to_bytes(8, "little")
    return bytes(buf)


def used_file() -> bytes:
    buf = fresh(8)
    add_generation(state_of(buf), 0, 5, master_pid=1, master_started=1)
    return bytes(buf)


BAD_CONTENTS = {
    "random bytes": (os.urandom(layout.file_size(8)), "wrong magic"),
    "truncated, with records": (used_file()[:1000], "need"),
    "wrong magic": (b"NOTOURS!" + valid_file()[8:], "wrong magic"),
    "older version": (with_word(layout.H.VERSION, 3), "format version 3"),
    "newer version": (with_word(layout.H.VERSION, 5), "format version 5"),
    "wrong size": (valid_file() + b"\0" * 64, "need"),
}


def refused(s: Server, message: str) -> None:
    """Gunicorn exits non-zero, naming the problem, and no worker ever started."""
    s.start()
    s.wait_exit()
    assert s.proc is not None and s.proc.returncode != 0
    log = s.log_text()
    assert message in log, log
    assert not s.events("worker_start")


@pytest.mark.parametrize("case", BAD_CONTENTS)
def test_a_state_file_that_is_not_ours_is_refused_and_untouched(
    server: Make, tmp_path: Path, case: str
) -> None:
    content, message = BAD_CONTENTS[case]
    path = tmp_path / "user.state"
    path.write_bytes(content)
    path.chmod(0o600)
    refused(server(state_file=str(path)), message)
    assert f"state file {path}" in server_log_of(tmp_path)
    assert path.read_bytes() == content


@pytest.mark.parametrize("cut", [0, 1, 30, 300, layout.file_size(8) - 1])
def test_a_creation_cut_short_is_rebuilt(server: Make, tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.state"
    write(path, bytearray(valid_file()[:cut]))  # a crash or a full disk while it was made
    s = server(workers=1, state_file=str(path)).start(wait_workers=1)
    assert s.events("master_start")[0]["reason"] == "start"
    assert path.stat().st_size == layout.file_size(256) and path.stat().st_mode & 0o777 == 0o600
    s.stop()
    check_record(s.events())


def server_log_of(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in tmp_path.glob("instance*/gunicorn.log"))


def test_a_symlink_is_refused_and_its_target_untouched(server: Make, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_bytes(b"the user's data")
    link = tmp_path / "link.state"
    link.symlink_to(target)
    refused(server(state_file=str(link)), "is a symbolic link")
    assert target.read_bytes() == b"the user's data" and link.is_symlink()


def test_a_directory_is_refused(server: Make, tmp_path: Path) -> None:
    (tmp_path / "dir.state").mkdir()
    refused(server(state_file=str(tmp_path / "dir.state")), "is a directory")


def test_a_fifo_is_refused(server: Make, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.state", 0o600)
    refused(server(state_file=str(tmp_path / "fifo.state")), "is not a regular file")


def test_a_file_of_another_owner_is_refused(server: Make, tmp_path: Path) -> None:
    path = tmp_path / "theirs.state"
    path.write_bytes(valid_file())
    path.chmod(0o600)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    refused(server(state_file=str(path)), f"is owned by uid {NOBODY.pw_uid}")
    assert path.read_bytes() == valid_file()


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_file_writable_by_others_is_refused(server: Make, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "open.state"
    path.write_bytes(valid_file())
    path.chmod(mode)
    refused(server(state_file=str(path)), "is writable by group or others")
    assert path.read_bytes() == valid_file() and path.stat().st_mode & 0o777 == mode


def test_a_missing_directory_is_refused(server: Make, tmp_path: Path) -> None:
    refused(server(state_file=str(tmp_path / "nowhere" / "x.state")), "does not exist")
    assert not (tmp_path / "nowhere").exists()


@pytest.fixture(params=[0o755, 0o1777], ids=["private", "sticky"])
def shared_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory an unprivileged user can traverse (pytest's tmp_path is 0700); and one
    like /tmp, sticky and open to all, where files of two owners must still work."""
    directory = Path(tempfile.mkdtemp(prefix="lifecycle-"))
    directory.chmod(request.param)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_an_unwritable_directory_is_refused(server: Make, tmp_path: Path) -> None:
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    s = server(state_file=str(readonly / "x.state"))
    s.start(prefix=("setpriv", "--bounding-set", "-dac_override"))  # root, bound by modes
    s.wait_exit()
    assert s.proc is not None and s.proc.returncode != 0
    assert f"directory {readonly} is not writable by uid 0" in s.log_text()
    assert os.listdir(readonly) == []


@pytest.mark.parametrize(("option", "value", "message"), [
    ("interval", 0, "interval must be"),
    ("interval", -1, "interval must be"),
    ("failed", -1, "failed must be"),
    ("on_error", "explode", "on_error must be"),
    ("lock_timeout", 0, "lock_timeout must be"),
    ("worker_lost", "not callable", "worker_lost must be a callable"),
])
def test_a_bad_option_stops_gunicorn_with_its_name(
    server: Make, option: str, value: Any, message: str
) -> None:
    s = server(**{option: value})
    refused(s, message)


def test_capacity_exhausted_leaves_a_worker_untracked_and_counts_exact(server: Make) -> None:
    s = server(workers=3, slots=2).start(wait_workers=2)
    wait_for(lambda: "has no free slot" in s.log_text(), "the capacity error in the log")
    wait_for(lambda: len(s.live_workers(s.pid)) == 3, "three workers serving")
    for _ in range(6):
        assert s.request().startswith(b"HTTP/1.0 200")
    (generation,) = read_status(s.state_file)["generations"]
    tracked = {w["pid"] for w in generation["workers"]}
    assert tracked == {e["pid"] for e in s.events("worker_start")} and len(tracked) == 2
    s.stop()
    check_record(s.events())
    assert read_status(s.state_file)["generations"] == []


def test_a_callback_blocking_past_lock_timeout_names_the_holder(server: Make) -> None:
    s = server(workers=2, lock_timeout=1.0, block={"worker_start": 4.0}).start()
    holder = s.wait_count("worker_start", 1)[0]["pid"]
    wait_for(lambda: "gave up on the turn for worker_start" in s.log_text(), "the turn timeout")
    line = next(x for x in s.log_text().splitlines() if "gave up on the turn" in x)
    assert f"pid {holder} (worker_start) has made no progress for " in line and "after 1.0s" in line
    assert "no worker_start callback" in line
    wait_for(lambda: len(s.live_workers(s.pid)) == 2, "both workers running")
    assert s.request().startswith(b"HTTP/1.0 200")
    s.wait_booted(workers=2)  # both registered: the bookkeeping never waited on the callback
    s.stop()
    assert len(s.events("worker_start")) == 1, "the other one started without a callback"
    check_record(s.events())  # ...and so got no end event either


def readable_by_nobody(path: Path) -> bool:
    return subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                           "--clear-groups", "test", "-r", str(path)]).returncode == 0


def test_privilege_drop_leaves_workers_no_way_to_truncate(shared_dir: Path) -> None:
    # What a worker running as nobody imports after the drop lies in a world-readable
    # directory: the checkout may be in a private one (a clone in `mktemp -d`).
    app = shared_dir / "app"
    shutil.copytree(REPO / "example_app", app / "example_app")
    for path in (app, *app.rglob("*")):  # copies keep the checkout's modes (umask 077 too)
        path.chmod(0o755 if path.is_dir() else 0o644)
    for path in (app, app / "example_app", app / "example_app" / "app.py"):
        assert readable_by_nobody(path), f"{path} must be readable by nobody for this test"
    s = Server(shared_dir, workers=2, interval=0.2, failed=0.3,
               settings="user = 'nobody'\ngroup = 'nogroup'\ntimeout = 0")
    s.pythonpath = app
    try:
        s.start(wait_workers=2)
        info = os.stat(s.state_file)
        assert (info.st_uid, info.st_mode & 0o777) == (os.geteuid(), 0o600), "the master's"
        assert not os.path.exists(s.state_file + ".lock")
        workers = [e["pid"] for e in s.events("worker_start")]
        s.wait_booted()  # worker_start runs in post_fork, before Gunicorn drops privileges
        for pid in workers:
            assert os.stat(f"/proc/{pid}").st_uid == NOBODY.pw_uid
            (fd,) = fds_to(pid, s.state_file)  # its own, for the lock: read-only
            assert open_mode(pid, fd) == os.O_RDONLY, "no descriptor that could truncate it"

        def fresh_beats() -> bool:
            (gen,) = read_status(s.state_file)["generations"]
            ages = [w["heartbeat_age"] for w in gen["workers"]]
            return len(ages) == 2 and all(age < 0.2 for age in ages)

        wait_for(fresh_beats, "heartbeats written by the unprivileged workers")
        s.wait_settled()
        os.kill(workers[0], signal.SIGSTOP)  # found by the other worker's sweep, as nobody
        try:
            lost = s.wait_count("worker_lost", 1)[0]
        finally:
            os.kill(workers[0], signal.SIGCONT)
        assert lost["reason"] == "heartbeat" and lost["in_pid"] == workers[1]
        os.kill(workers[1], signal.SIGKILL)  # reaped by the root master
        crash = s.wait_count("worker_lost", 2)[-1]
        assert crash["reason"] == "crash" and crash["pid"] == workers[1]
        s.stop()
        assert only_reason(s.events("master_exit")) == "stop"
        assert s.events("worker_exit"), "exits of the unprivileged workers"
        assert "Permission denied" not in s.log_text()
        check_record(s.events())
    finally:
        s.kill_all()


def open_mode(pid: int, fd: str) -> int:
    flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
    return flags & os.O_ACCMODE


def only_reason(events: list[dict[str, Any]]) -> str:
    assert len(events) == 1, events
    return str(events[0]["reason"])


def test_churn_under_load_keeps_exact_counts(server: Make) -> None:
    s = server(workers=4, settings="max_requests = 1", interval=0.1, failed=1.0)
    s.start(wait_workers=4)
    load = Load(s, clients=4, each=75).join()
    assert not load.failures, load.failures[:3]

    def listed_equals_live() -> bool:
        (gen,) = read_status(s.state_file)["generations"]
        live = set(s.live_workers(s.pid))
        return len(live) == 4 and {w["pid"] for w in gen["workers"]} == live

    wait_for(listed_equals_live, "status to list exactly the live workers")
    check_record(s.events(), closed=False)
    s.stop()
    events = s.events()
    assert len(s.events("worker_start")) >= 300
    assert len(s.events("worker_start")) == len(s.events("worker_exit")) + len(
        s.events("worker_lost"))
    check_record(events)


def crafted_state(path: Path, master_pid: int, worker_pid: int) -> None:
    """A state whose records hold live pids with start times that are not theirs."""
    buf = fresh(8)
    state = state_of(buf)
    add_generation(state, 0, 7, master_pid=master_pid, master_started=own_start_time() + 12345)
    add_worker(state, 0, 7, worker_pid, own_start_time() + 12345)
    write(path, buf)


def test_a_reused_pid_is_not_a_live_master_or_worker(server: Make, tmp_path: Path) -> None:
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        path = tmp_path / "reused.state"
        crafted_state(path, master_pid=unrelated.pid, worker_pid=os.getpid())
        (gen,) = read_status(str(path))["generations"]
        assert gen["master_alive"] is False
        s = server(workers=1, state_file=str(path)).start(wait_workers=1)
        start = s.events("master_start")[0]
        assert start["reason"] == "restart" and start["generation"] == 8 and start["n_prev"] is None
        assert [g["generation"] for g in read_status(str(path))["generations"]] == [8]
        s.stop()
        assert unrelated.poll() is None, "the unrelated process was left alone"
    finally:
        unrelated.kill()
        unrelated.wait()


def fds_to(pid: int, path: str) -> list[str]:
    """The descriptors of ``pid`` open on the file at ``path`` (by inode: names can change)."""
    target = os.stat(path)
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
            found.append(fd)
    return found


def test_usr2_reexec_leaks_no_descriptor(server: Make) -> None:
    s = server(workers=1).start(wait_workers=1)
    (own,) = fds_to(s.pid, s.state_file)  # the one descriptor, for the lock and size checks
    flags = int(Path(f"/proc/{s.pid}/fdinfo/{own}").read_text().split("flags:")[1].split()[0], 8)
    assert flags & 0o2000000, "close-on-exec"
    assert open_mode(s.pid, own) == os.O_RDONLY
    s.signal(signal.SIGUSR2)
    new_master = s.wait_count("master_start", 1, reason="upgrade")[0]["in_pid"]
    assert len(fds_to(new_master, s.state_file)) == 1, "its own descriptor, nothing inherited"
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    s.stop()


def test_a_slow_worker_lost_callback_makes_no_false_losses(server: Make) -> None:
    s = server(workers=3, interval=0.2, failed=0.3, block={"worker_lost": 3.0})
    s.start(wait_workers=3)
    victim = s.events("worker_start")[0]["pid"]
    os.kill(victim, signal.SIGKILL)  # the master's worker_lost callback runs for 3 s
    s.wait_count("worker_start", 4)  # the respawn's callback waits its turn
    sweeps: set[int] = set()

    def swept_again() -> bool:
        sweeps.add(header_word(s.state_file, layout.H.NEXT_SWEEP))
        return len(sweeps) >= 4

    wait_for(swept_again, "a few sweeps after the slow callback")
    s.stop()
    assert [e["pid"] for e in s.events("worker_lost")] == [victim], "healthy workers stay"
    check_record(s.events())


def test_a_lock_timeout_at_start_is_logged_and_the_server_serves(server: Make) -> None:
    s = server(workers=1, lock_timeout=0.5)
    write(Path(s.state_file), fresh(256))
    with open(s.state_file, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the lock is the state file's own
        s.start()
        wait_for(lambda: "gave up on master_start" in s.log_text(), "the lock timeout error")
        wait_for(lambda: os.path.exists(s.sock) and s.request().startswith(b"HTTP/1.0 200"),
                 "the server to serve")
    assert "wire `on_starting" not in s.log_text()
    s.stop()
    assert s.events() == []


def test_a_state_of_another_boot_is_a_restart(server: Make, tmp_path: Path) -> None:
    live = subprocess.Popen(["sleep", "60"])
    try:
        path = tmp_path / "old-boot.state"
        buf = fresh(8)
        state = state_of(buf)
        state.set_header(layout.H.BOOT_ID, 12345)  # another boot's
        started = start_time(live.pid)
        assert started is not None
        add_generation(state, 0, 1, master_pid=live.pid, master_started=started)
        state.set_header(layout.H.NEXT_SWEEP, 2**62)  # a monotonic stamp far ahead of this boot
        write(path, buf)
        s = server(workers=2, state_file=str(path), interval=0.1, failed=0.1)
        s.start(wait_workers=2)
        assert s.events("master_start")[0]["reason"] == "restart"
        wait_for(lambda: header_word(str(path), layout.H.NEXT_SWEEP) < 2**62, "a sweep")
        s.stop()
        assert live.poll() is None, "the live process of the other boot was left alone"
    finally:
        live.kill()
        live.wait()


REAP_IN_THE_HANDLER = """
def when_ready(server):
    import signal
    # As Gunicorn 21 and 22 do: reap (and call child_exit) from the SIGCHLD handler itself.
    signal.signal(signal.SIGCHLD, lambda signum, frame: server.reap_workers())
"""


def test_a_signal_handler_cannot_reenter_a_transaction(server: Make) -> None:
    s = server(workers=3, settings=REAP_IN_THE_HANDLER, block={"worker_lost": 1.5},
               interval=30.0).start(wait_workers=3)
    first, second = (e["pid"] for e in s.events("worker_start")[:2])
    os.kill(first, signal.SIGKILL)  # its worker_lost callback holds the lock for 1.5 s
    wait_for(lambda: Path(str(s.record) + ".worker_lost").exists(), "the blocking callback")
    os.kill(second, signal.SIGKILL)  # SIGCHLD now: its handler would re-enter the lock
    lost = s.wait_count("worker_lost", 2, timeout=10)
    assert {e["pid"] for e in lost} == {first, second}
    assert "gave up" not in s.log_text()
    s.stop()
    check_record(s.events())
