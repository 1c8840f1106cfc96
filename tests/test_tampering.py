"""What others do to the state file while servers use it (SPEC section 6): deleted files
beside it, truncation, growth, scribbling, a half-written record, other pid namespaces,
bursts of reloads. The master never dies of it, and serves on."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gunicorn_lifecycle import layout
from gunicorn_lifecycle.layout import G, H
from gunicorn_lifecycle.status import read_status
from harness import Server, alive, check_record, wait_for

Make = Callable[..., Server]


def serves(s: Server, times: int = 10) -> None:
    for _ in range(times):
        assert s.request().startswith(b"HTTP/1.0 200")


def test_mutual_exclusion_survives_deleted_and_replaced_files_beside_it(server: Make) -> None:
    s = server(workers=1, block={"worker_start": 2.0}).start()
    first = s.wait_count("worker_start", 1)[0]
    directory = Path(s.state_file).parent
    for path in directory.iterdir():  # what a cleaner of the directory could remove
        if path.name.startswith("lifecycle.state") and str(path) != s.state_file:
            path.unlink()
    Path(s.state_file + ".lock").write_text("a decoy, as if someone recreated it")
    s.signal(signal.SIGTTIN)  # a worker forked after the cleaning
    second = s.wait_count("worker_start", 2)[-1]
    assert second["t"] >= first["t"] + 2.0, "the two callbacks ran at once"
    s.stop()
    check_record(s.events())


@contextlib.contextmanager
def writable(path: str) -> Iterator[mmap.mmap]:
    """The state file as another program of the same user would map it."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapping:
        yield mapping


def test_a_truncation_during_a_master_callback(server: Make) -> None:
    s = server(workers=2, block={"master_start": 2.0}).start()
    wait_for(lambda: Path(f"{s.record}.master_start").exists(), "master_start running")
    os.truncate(s.state_file, 0)
    wait_for(lambda: "was truncated from" in s.log_text(), "the truncation in the log")
    assert s.proc is not None and s.proc.poll() is None, "the master lives"
    wait_for(lambda: len(s.live_workers(s.pid)) == 2, "two workers")
    serves(s)
    s.signal(signal.SIGTERM)
    s.wait_exit()
    assert s.proc.returncode == 0
    assert "SIGBUS" not in s.log_text()


@pytest.mark.parametrize("change", ["truncate", "grow", "scribble records", "scribble header"])
def test_a_file_changed_while_the_server_runs(server: Make, change: str) -> None:
    s = server(workers=3, interval=0.2, failed=0.5).start(wait_workers=3)
    # Settled: the generation ready and told, so that no bookkeeping is under way (a
    # truncation between a size check and the touch that follows it is beyond any check).
    s.wait_count("master_ready", 1)
    size = os.path.getsize(s.state_file)
    if change == "truncate":
        os.truncate(s.state_file, 0)
    elif change == "grow":
        os.truncate(s.state_file, size + 4096)
    else:
        with writable(s.state_file) as mapping:
            first, last = ((layout.GENERATIONS_AT * 8, size) if change == "scribble records"
                           else (0, layout.HEADER_WORDS * 8))
            mapping[first:last] = os.urandom(last - first)
    victim = s.live_workers(s.pid)[0]
    os.kill(victim, signal.SIGKILL)  # the master's child_exit meets the file
    wait_for(lambda: "lifecycle is off" in s.log_text() and s.state_file in s.log_text(),
             "the damage, named, in the log")
    wait_for(lambda: len(s.live_workers(s.pid)) == 3, "a new worker for the one killed")
    s.signal(signal.SIGHUP)
    wait_for(lambda: victim not in s.live_workers(s.pid) and len(s.live_workers(s.pid)) == 3,
             "a reload")
    serves(s)
    s.signal(signal.SIGTERM)
    s.wait_exit()
    assert s.proc is not None and s.proc.returncode == 0, "the master stopped as asked"
    log = s.log_text()
    assert "SIGBUS" not in log and "Traceback" not in log, s.log_tail(30)


def test_a_half_written_record_is_repaired_at_once(server: Make) -> None:
    s = server(workers=2, interval=0.1, failed=0.5).start(wait_workers=2)
    s.wait_booted()
    (gen,) = read_status(s.state_file)["generations"]
    with writable(s.state_file) as mapping:

        def word(index: int, value: int | None = None) -> int:
            if value is not None:
                mapping[index * 8 : index * 8 + 8] = value.to_bytes(8, "little")
            return int.from_bytes(mapping[index * 8 : index * 8 + 8], "little")

        at = next(layout.generation_at(i) for i in range(layout.GENERATIONS)
                  if word(layout.generation_at(i) + G.NUMBER) == gen["generation"])
        word(H.DIRTY, at)  # what a writer killed in the middle of a change leaves
        word(at, word(at) | 1)
        wait_for(lambda: word(at) % 2 == 0 and word(H.DIRTY) == 0,
                 "the next lock holder (a sweep, within an interval) to repair it", timeout=1.0)
    status = read_status(s.state_file)
    assert not status["unknown"] and [g["generation"] for g in status["generations"]] == [
        gen["generation"]]
    s.stop()
    check_record(s.events())


def in_another_pid_namespace(s: Server) -> subprocess.Popen[bytes]:
    """Start ``s`` as the first process of a new pid namespace, as a container runtime does."""
    s.start(prefix=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"))
    return s.proc  # type: ignore[return-value]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_master_of_another_pid_namespace(server: Make, tmp_path: Path) -> None:
    state = str(tmp_path / "shared.state")
    contained = server(workers=2, state_file=state)
    in_another_pid_namespace(contained)
    contained.wait_count("worker_start", 2)
    outside = server(workers=1, state_file=state).start()
    outside.wait_exit()
    assert outside.proc is not None and outside.proc.returncode != 0
    assert "in use by the live Gunicorn master" in outside.log_text()
    assert not outside.events()

    os.killpg(contained.pid, signal.SIGKILL)  # the container is killed, its namespace gone
    contained.proc.wait()  # type: ignore[union-attr]
    wait_for(lambda: not group_alive(contained.pid), "every process of the namespace gone")
    again = server(workers=1, state_file=state).start(wait_workers=1)
    restart = again.events("master_start")[0]
    assert restart["reason"] == "restart"
    again.stop()


def test_a_burst_of_reloads_that_outruns_the_records(server: Make) -> None:
    s = server(workers=1, interval=60.0, settings="timeout = 0\ngraceful_timeout = 0")
    s.start(wait_workers=1)
    stopped: list[int] = []
    try:
        for n in range(layout.GENERATIONS + 3):
            s.wait_count("worker_start", n + 1)  # each reload forks one worker
            s.wait_settled()  # handlers set up (a signal before would be missed), nothing owed
            for pid in s.live_workers(s.pid):
                if pid not in stopped:  # old workers that do not drain (stuck on a request)
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            s.signal(signal.SIGHUP)
            wait_for(lambda n=n: len(s.live_workers(s.pid)) == n + 2, f"reload {n + 1}")
        serves(s)
        log = s.log_text()
        assert log.count("every generation record of") == 1, "logged once per burst"
        assert len(s.events("master_start")) == layout.GENERATIONS
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)  # they had TERM pending: they exit, their records free
    wait_for(lambda: len(read_status(s.state_file)["generations"]) == 1, "the burst drained")
    s.wait_booted()
    # The last reload re-reads a graceful stop: with graceful_timeout = 0, Gunicorn SIGKILLs a
    # worker right after its TERM, maybe inside its worker_exit, after it counted, before it
    # was told (seen once, in a clean-clone run of the suite).
    s.conf.write_text(s.conf.read_text() + "\ngraceful_timeout = 10\n")
    s.signal(signal.SIGHUP)
    s.wait_count("master_start", layout.GENERATIONS + 1)
    assert "reloads found no free generation record and were folded" in s.log_text()
    s.wait_booted(workers=1)  # a worker still starting would miss the TERM
    s.wait_settled()
    s.stop()
    check_record(s.events())


def test_a_crash_after_a_burst_of_reloads_does_not_wedge_the_next_start(server: Make) -> None:
    s = server(workers=1, interval=60.0, settings="timeout = 0\ngraceful_timeout = 0")
    s.start(wait_workers=1)
    stopped: list[int] = []
    for n in range(layout.GENERATIONS - 1):
        s.wait_count("worker_start", n + 1)
        s.wait_settled()  # no worker is stopped holding the turn or the lock
        for pid in s.live_workers(s.pid):
            if pid not in stopped:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        s.signal(signal.SIGHUP)
        s.wait_count("master_start", n + 2)
    os.killpg(s.pid, signal.SIGKILL)  # the OOM killer takes the master and its workers
    s.wait_exit()
    for pid in stopped:
        wait_for(lambda pid=pid: not alive(pid), f"worker {pid} gone")
    again = server(workers=1, state_file=s.state_file).start(wait_workers=1)
    assert again.events("master_start")[0]["reason"] == "restart"
    again.stop()
    assert [g["generation"] for g in read_status(s.state_file)["generations"]] == []


def test_closed_records_are_reused(server: Make) -> None:
    s = server(workers=1, interval=60.0).start(wait_workers=1)
    for n in range(layout.GENERATIONS + 8):
        s.wait_booted(workers=1)
        s.signal(signal.SIGHUP)
        s.wait_count("master_exit", n + 1, reason="reload")
    assert s.events("master_start")[-1]["generation"] == layout.GENERATIONS + 9
    s.stop()
    check_record(s.events())
