"""One state file per lineage, whatever forks, flips or polls it (SPEC section 6): a helper
forked from a master never keeps it alive, a USR2 master keeps its parent's file across a
release flip, and a command that polls the state keeps its descriptors flat."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gunicorn_lifecycle.status import read_status
from harness import CALLBACKS, REPO, Server, check_record, wait_for

Make = Callable[..., Server]

# What a master_start callback may start: each lives on after the master is killed.
HELPERS = ("multiprocessing.get_context('fork').Process(target=time.sleep, args=(600,)).start()"
           "; os.fork() or (time.sleep(600), os._exit(0)); subprocess.Popen(['sleep', '600'])")
DIRTY_APP = "from gunicorn.dirty.app import DirtyApp\n\n\nclass Idle(DirtyApp):\n    pass\n"


def configure(s: Server, master_start: str = "") -> str:
    """The harness's recording configure(), with ``master_start`` run after the recorder."""
    return ("import multiprocessing\n"
            "def _helper(event):\n"
            f"    if event.reason == 'start':\n        {master_start or 'pass'}\n"
            f"_callbacks = {{name: _record(name) for name in {CALLBACKS!r}}}\n"
            "_callbacks['master_start'] = [_callbacks['master_start'], _helper]\n"
            f"gunicorn_lifecycle.configure(**_callbacks, state_file={s.state_file!r}, "
            "interval=0.5, failed=0.5)\n")


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@pytest.mark.parametrize("helper", ["callback helpers", "dirty arbiter"])
def test_a_helper_forked_from_the_master_does_not_keep_it_alive(server: Make, helper: str
                                                                ) -> None:
    """Helpers forked from the master (by multiprocessing, os.fork() and subprocess in its
    master_start callback; Gunicorn 25+'s dirty arbiter) outlive it after kill -9: the next
    start is a restart, not refused as if the master lived."""
    s = server(workers=2, record=False)
    if helper == "dirty arbiter":
        pytest.importorskip("gunicorn.dirty", reason="Gunicorn < 25 has no dirty arbiter")
        (s.directory / "dirty_idle.py").write_text(DIRTY_APP)
        extra = (f"import sys\nsys.path.insert(0, {str(s.directory)!r})\ndirty_workers = 1\n"
                 "dirty_apps = ['dirty_idle:Idle']\n")
    else:
        extra = ""
    s.conf.write_text(s.conf.read_text() + configure(s, "" if extra else HELPERS) + extra)
    s.start(wait_workers=2)
    s.wait_settled()
    workers = {w["pid"] for g in read_status(s.state_file)["generations"] for w in g["workers"]}
    helpers = wait_for(lambda: len(children(s.pid) - workers) >= (1 if extra else 3) and (
        children(s.pid) - workers), f"the {helper} of the master")
    first = s.proc
    try:
        for pid in helpers | {p for h in helpers for p in children(h)}:
            os.kill(pid, signal.SIGSTOP)  # it lives on (a dirty arbiter would notice and exit)
        for pid in (s.pid, *workers):
            os.kill(pid, signal.SIGKILL)
        for pid in (s.pid, *workers):
            s.wait_exit(pid)
        s.start(wait_workers=2)  # the same config, the same state file
        restart = s.wait_count("master_start", 1, reason="restart")[0]
        crash = s.events("master_exit")
        assert [(e["generation"], e["reason"]) for e in crash] == [(1, "crash")], crash
        assert restart["generation"] == 2
        assert "in use by the live Gunicorn master" not in s.log_text()
        s.stop()
    finally:
        assert first is not None
        os.killpg(first.pid, signal.SIGKILL)  # the first session: its helpers
    check_record(s.events(), lineage=lambda g: g)


@pytest.mark.parametrize("copied", [False, True], ids=["fresh release", "file copied along"])
def test_usr2_after_a_release_flip_keeps_the_parents_state_file(server: Make, tmp_path: Path,
                                                                copied: bool) -> None:
    # Capistrano-style: current -> releases/r1, a relative state_file beside the config.
    s = server(workers=2, state_file="lifecycle.state")
    r1, r2, current = s.directory, tmp_path / "r2", tmp_path / "current"
    current.symlink_to(r1)
    s.conf, s.state_file = current / "gunicorn.conf.py", str(r1 / "lifecycle.state")
    s.start(wait_workers=2)
    s.wait_settled()
    r2.mkdir()
    shutil.copy(r1 / "gunicorn.conf.py", r2 / "gunicorn.conf.py")
    if copied:
        shutil.copy(r1 / "lifecycle.state", r2 / "lifecycle.state")
        copy = (r2 / "lifecycle.state").read_bytes()
    flipped = tmp_path / "current.new"
    flipped.symlink_to(r2)
    flipped.replace(current)  # the release flips under the running server
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.wait_count("worker_start", 2, generation=upgrade["generation"])
    assert "uses its state file" in s.log_text() and str(r1 / "lifecycle.state") in s.log_text()
    s.signal(signal.SIGTERM)
    s.wait_exit()
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_exit(upgrade["in_pid"])
    assert [(e["generation"], e["reason"]) for e in s.events("master_exit")] == [
        (1, "upgrade"), (upgrade["generation"], "stop")]
    assert [e["reason"] for e in s.events("master_start")] == ["start", "upgrade"]
    if copied:
        assert (r2 / "lifecycle.state").read_bytes() == copy, "the copy was left alone"
    else:
        assert not (r2 / "lifecycle.state").exists()
    check_record(s.events())


def python313() -> str | None:
    """A Python 3.13 of this machine (pyenv's too), if there is one."""
    pyenv = os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv"))
    for candidate in [*sorted(glob.glob(f"{pyenv}/versions/3.13*/bin/python3.13")),
                      shutil.which("python3.13")]:
        if candidate and subprocess.run([candidate, "-c", "import mmap"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


def test_a_command_polling_the_state_keeps_its_descriptors(server: Make, tmp_path: Path) -> None:
    """``wait`` polls the state for 10 s, under this Python and under 3.13 (whose mmap keeps no
    descriptor of its own, so that a state file left unclosed leaked one per read)."""
    from gated import Gate

    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=1))  # its worker never boots: never ready
    wait_for(lambda: os.path.exists(s.state_file) and read_status(s.state_file)["generations"],
             "the generation open")
    pythons = [sys.executable, *filter(None, [python313()])]
    waiting = [subprocess.Popen([python, "-m", "gunicorn_lifecycle", "wait", "--state",
                                 s.state_file, "--timeout", "10"], stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
               for python in pythons]
    counts: dict[str, list[tuple[float, int]]] = {python: [] for python in pythons}
    began = time.monotonic()
    while any(w.poll() is None for w in waiting):  # sampled every 0.2 s while they poll
        for python, w in zip(pythons, waiting, strict=True):
            with contextlib.suppress(OSError):  # it exited meanwhile
                counts[python].append((time.monotonic() - began,
                                       len(os.listdir(f"/proc/{w.pid}/fd"))))
        time.sleep(0.2)
    for python, w in zip(pythons, waiting, strict=True):
        _, err = w.communicate()
        assert w.returncode == 1 and b"waited 10s" in err, (python, err)
        settled = [n for at, n in counts[python] if at > 1.0]
        assert len(settled) > 20 and max(settled) - min(settled) <= 2, (python, counts[python])
    gate.let(1)
    s.stop()
    if len(pythons) == 1:
        pytest.skip("checked under this Python only: no Python 3.13 on this machine")
