"""systemd's notification protocol, as a unit with ``Type=notify`` and ``NotifyAccess=all``
would receive it (SPEC section 9): a datagram socket bound as ``NOTIFY_SOCKET``."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gated import Gate
from states import fresh, write

from gunicorn_lifecycle.status import read_status
from harness import GUNICORN, Server, alive, check_record, wait_for

Make = Callable[..., Server]
GUNICORNS_OWN = "READY=1\nSTATUS=Gunicorn arbiter booted"
FILLER = "X_FILLER=1"  # what the test itself queues to make a sender wait


class Systemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, in arrival order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[str] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._receive)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            if self._paused.is_set():
                self._stop.wait(0.01)
                continue
            try:
                message = self._socket.recv(4096).decode()
            except TimeoutError:
                continue
            if message != FILLER:
                self.received.append(message)

    def pause(self) -> None:
        """Stop reading, and fill the socket's queue: the next sender blocks until resume()."""
        self._paused.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.connect(str(self.path))
            filler.setblocking(False)
            try:
                while True:
                    filler.send(FILLER.encode())
            except BlockingIOError:
                pass

    def resume(self) -> None:
        self._paused.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def saying(self, word: str) -> list[str]:
        """The messages with a line that starts with ``word`` (``READY=1``, ``MAINPID=``)."""
        return [m for m in list(self.received) if any(line.startswith(word)
                                                      for line in m.splitlines())]

    def wait(self, word: str, count: int = 1) -> list[str]:
        return wait_for(lambda: len(found := self.saying(word)) >= count and found,
                        f"{count} notification(s) with {word}: got {self.received}")


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    receiver = Systemd(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def test_ready_only_once_every_worker_booted(server: Make, systemd: Systemd,
                                             tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.server(server, workers=2, interval=0.2, failed=1.0)
    s.start(env={**gate.env, **systemd.env})
    s.wait_registered(2)
    systemd.wait("STATUS=generation 1 (start, starting): 0 of 2")  # what master_start said
    assert not systemd.saying("READY=1"), "Gunicorn's early READY=1 is taken over"
    gate.let(2)
    (ready,) = systemd.wait("READY=1")
    booted = [w["booted"] for g in read_status(s.state_file)["generations"] for w in g["workers"]]
    assert booted == [True, True], "said by the boot that made the generation ready"
    assert ready == f"MAINPID={s.pid}\nREADY=1\nSTATUS=generation 1 (start, ready): 2 of 2 workers"
    assert GUNICORNS_OWN not in systemd.received
    s.stop()
    systemd.wait("STOPPING=1")


@pytest.mark.parametrize("version", ["23.0.0", None], ids=["gunicorn-23", "installed"])
def test_reload_then_upgrade_then_stop(server: Make, systemd: Systemd,
                                       version: str | None) -> None:
    s = server(workers=2, interval=0.2, failed=1.0, gunicorn=version)
    s.start(wait_workers=2, env=systemd.env)
    systemd.wait("READY=1")
    s.signal(signal.SIGHUP)
    (reloading,) = systemd.wait("RELOADING=1")
    usec = int(reloading.split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(usec / 1e6 - time.monotonic()) < 10, "CLOCK_MONOTONIC, in microseconds"
    second = systemd.wait("READY=1", 2)[1]
    assert systemd.received.index(reloading) < systemd.received.index(second)
    assert "generation 2 (reload, ready): 2 of 2 workers" in second

    s.signal(signal.SIGUSR2)  # after the HUP: the re-read config must still hand on the socket
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    (mainpid,) = systemd.wait(f"MAINPID={upgrade['in_pid']}")
    assert mainpid.startswith(f"MAINPID={upgrade['in_pid']}\nREADY=1\n"), mainpid
    assert len(s.events("worker_start", generation=upgrade["generation"])) == 2
    s.signal(signal.SIGTERM)  # the old master retires: the unit is not stopping
    s.wait_exit()
    s.wait_count("master_exit", 2)  # generation 1 (reload) and 2 (upgrade)
    assert not systemd.saying("STOPPING=1")
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    systemd.wait("STOPPING=1")
    s.wait_count("master_exit", 3)
    check_record(s.events())


def test_a_rollback_gives_the_main_pid_back(server: Make, systemd: Systemd) -> None:
    s = server(workers=1, interval=0.2, failed=1.0).start(wait_workers=1, env=systemd.env)
    systemd.wait("READY=1")
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    systemd.wait(f"MAINPID={upgrade['in_pid']}")
    s.signal(signal.SIGTERM, upgrade["in_pid"])  # back to the old master
    back = systemd.wait(f"MAINPID={s.pid}", 2)[1]
    assert back.startswith(f"MAINPID={s.pid}\nSTATUS="), back
    assert not systemd.saying("STOPPING=1")
    s.stop()
    systemd.wait("STOPPING=1")


def test_the_watchdog_is_fed_by_healthy_sweeps(server: Make, systemd: Systemd) -> None:
    s = server(workers=2, interval=0.1, failed=0.5)
    s.start(wait_workers=2, env={**systemd.env, "WATCHDOG_USEC": "2000000"})
    pings = len(systemd.wait("WATCHDOG=1", 3))
    for pid in s.live_workers(s.pid):
        os.kill(pid, signal.SIGSTOP)  # no heartbeat anywhere: nobody sweeps, nobody pings
    try:
        settled = len(systemd.saying("WATCHDOG=1"))
        wait_for(lambda: all(w["late"] for g in read_status(s.state_file)["generations"]
                             for w in g["workers"]), "every heartbeat late")
        assert len(systemd.saying("WATCHDOG=1")) - settled <= 2, "in flight when stopped"
    finally:
        for pid in s.live_workers(s.pid):
            os.kill(pid, signal.SIGCONT)
    assert pings >= 3
    s.stop()


def test_systemd_false_leaves_gunicorns_own_notification(server: Make, systemd: Systemd,
                                                         tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.server(server, workers=2, systemd=False)
    s.start(env={**gate.env, **systemd.env})
    s.wait_registered(2)
    systemd.wait("READY=1")
    assert systemd.received == [GUNICORNS_OWN], "before any worker booted, and alone"
    gate.let(2)
    s.stop()
    assert systemd.received == [GUNICORNS_OWN]


def test_a_usr2_master_given_a_hup_before_it_was_ready_is_followed(
    server: Make, systemd: Systemd, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.server(server, workers=2, interval=0.2, failed=1.0)
    s.start(env={**gate.env, **systemd.env})
    s.wait_registered(2)
    gate.let(2)
    systemd.wait("READY=1")
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.signal(signal.SIGHUP, upgrade["in_pid"])  # before its workers booted
    reload = s.wait_count("master_start", 1, reason="reload")[0]
    gate.let(4)
    s.wait_count("master_ready", 1, generation=reload["generation"])
    (follow,) = systemd.wait(f"MAINPID={upgrade['in_pid']}")
    assert follow.startswith(f"MAINPID={upgrade['in_pid']}\nREADY=1\n"), follow
    assert f"generation {reload['generation']} (reload, ready)" in follow


def test_a_new_master_killed_gives_the_main_pid_back(server: Make, systemd: Systemd) -> None:
    s = server(workers=1, interval=0.2, failed=0.5).start(wait_workers=1, env=systemd.env)
    systemd.wait("READY=1")
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    systemd.wait(f"MAINPID={upgrade['in_pid']}")
    os.kill(upgrade["in_pid"], signal.SIGKILL)  # no on_exit: whoever finds it dead says so
    back = systemd.wait(f"MAINPID={s.pid}", 2)[1]
    assert back.startswith(f"MAINPID={s.pid}\nSTATUS="), back
    assert s.wait_count("master_exit", 1)[0]["reason"] == "rollback"
    s.stop()


def test_a_start_that_could_not_open_a_generation_leaves_gunicorns_ready(
    server: Make, systemd: Systemd
) -> None:
    s = server(workers=1, lock_timeout=0.5)
    write(Path(s.state_file), fresh(8))
    with open(s.state_file, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # nobody gets the lock: the lifecycle is off
        s.start(env=systemd.env)
        systemd.wait("READY=1")
    assert systemd.received == [GUNICORNS_OWN], "the unit starts anyway"
    s.kill_all()


def test_a_reap_while_a_datagram_waits_is_deferred_on_gunicorn_23(server: Make,
                                                                  systemd: Systemd) -> None:
    # Gunicorn 21-23 reap in their SIGCHLD handler, which runs when the master's send is
    # interrupted: the reap's bookkeeping must wait for the send, not nest inside it.
    s = server(workers=2, interval=0.5, failed=1.0, gunicorn="23.0.0")
    s.start(wait_workers=2, env=systemd.env)
    systemd.wait("READY=1")
    victim = s.live_workers(s.pid)[0]
    systemd.pause()
    s.signal(signal.SIGHUP)
    wait_for(lambda: Path(f"/proc/{s.pid}/wchan").read_text() == "unix_wait_for_peer",
             "the master waiting to send RELOADING=1")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not alive(victim), "the killed worker reaped, in the handler")
    systemd.resume()
    lost = s.wait_count("worker_lost", 1)[0]
    assert lost["pid"] == victim and lost["reason"] == "crash"
    systemd.wait("RELOADING=1")
    systemd.wait("READY=1", 2)
    s.stop()
    systemd.wait("STOPPING=1")
    check_record(s.events())


def test_a_hup_to_the_old_master_after_an_upgrade_keeps_systemd_on_the_new_one(
    server: Make, systemd: Systemd
) -> None:
    s = server(workers=1, interval=0.2, failed=1.0).start(wait_workers=1, env=systemd.env)
    systemd.wait("READY=1")
    s.signal(signal.SIGUSR2)
    new = s.wait_count("master_start", 1, reason="upgrade")[0]["in_pid"]
    systemd.wait(f"MAINPID={new}")
    s.signal(signal.SIGHUP)  # `pkill -HUP gunicorn` reaches the old master too
    old_reload = s.wait_count("master_start", 1, reason="reload")[0]
    s.wait_count("master_ready", 1, generation=old_reload["generation"])
    s.signal(signal.SIGTERM)  # the old master retires
    s.wait_exit()
    s.wait_count("master_exit", 2)
    handover = systemd.wait(f"MAINPID={new}", 2)[1]
    assert handover.startswith(f"MAINPID={new}\nSTATUS="), handover
    said = systemd.received
    assert not any(m.startswith(f"MAINPID={s.pid}") for m in said[said.index(handover) - 1:]), said
    assert not systemd.saying("RELOADING=1"), "the old lineage's reload is not the unit's"
    assert not systemd.saying("STOPPING=1")
    s.signal(signal.SIGTERM, new)
    systemd.wait("STOPPING=1")


def test_an_old_master_retiring_before_its_successor_is_ready_hands_over(
    server: Make, systemd: Systemd, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    s = gate.server(server, workers=1, interval=0.2, failed=1.0)
    s.start(env={**gate.env, **systemd.env})
    s.wait_registered(1)
    gate.let(1)
    systemd.wait("READY=1")
    s.signal(signal.SIGUSR2)
    new = s.wait_count("master_start", 1, reason="upgrade")[0]["in_pid"]
    s.signal(signal.SIGTERM)  # before the new master's worker could boot
    s.wait_exit()
    handover = systemd.wait(f"MAINPID={new}")[0]
    assert "READY=1" not in handover and not systemd.saying("STOPPING=1")
    gate.let(1)
    ready = systemd.wait("READY=1", 2)[1]
    assert ready.startswith(f"MAINPID={new}\nREADY=1"), ready
    s.signal(signal.SIGTERM, new)
    systemd.wait("STOPPING=1")


def test_no_workers_leaves_gunicorns_own_notification(server: Make, systemd: Systemd) -> None:
    s = server(workers=0).start(env=systemd.env)
    systemd.wait("READY=1")  # nothing to wait for: Gunicorn's READY=1 is right
    s.signal(signal.SIGTERM)
    s.wait_exit()
    assert systemd.received == [GUNICORNS_OWN]


def _user_manager() -> bool:
    if shutil.which("systemd-run") is None:
        return False
    state = subprocess.run(["systemctl", "--user", "is-system-running"], capture_output=True,
                           text=True).stdout.strip()
    return state in ("running", "degraded")


@pytest.mark.skipif(not _user_manager(), reason="no systemd user manager on this machine "
                    "(systemctl --user is-system-running: not running or degraded); the "
                    "datagram tests above stand in for it")
def test_a_real_unit_follows_the_new_master(server: Make, tmp_path: Path) -> None:
    s = server(workers=2, interval=0.2, failed=1.0)
    unit = f"gunicorn-lifecycle-test-{os.getpid()}"
    command = ["systemd-run", "--user", "--unit", unit, "-p", "Type=notify",
               "-p", "NotifyAccess=all", "-p", "KillMode=mixed",
               f"--working-directory={s.directory}",
               f"--setenv=PYTHONPATH={os.environ.get('PYTHONPATH', '')}",
               GUNICORN, "-c", str(s.conf), "--pythonpath", str(s.pythonpath), s.app]
    subprocess.run(command, check=True, timeout=30)
    try:
        def show(what: str) -> str:
            return subprocess.run(["systemctl", "--user", "show", "-p", what, "--value", unit],
                                  capture_output=True, text=True).stdout.strip()

        wait_for(lambda: show("ActiveState") == "active", "the unit active (READY=1)", 30)
        old = int(show("MainPID"))
        done = subprocess.run([sys.executable, "-m", "gunicorn_lifecycle", "upgrade", "--state",
                               s.state_file, "--timeout", "60"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        new = int(show("MainPID"))
        assert new != old and show("ActiveState") == "active", "the unit followed the new master"
    finally:
        subprocess.run(["systemctl", "--user", "stop", unit], timeout=60)
