"""Real Gunicorn instances from generated configs; what /proc and the state file say of them.

Each instance runs in its own session, so that leaving its ``with`` block kills
the master and every worker with one ``killpg``, whatever went wrong. Every
config, bare or not, gets the same ``post_worker_init`` tail that appends the
worker's pid to a file: that is how a benchmark knows, without sleeping, that
all workers have booted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from gunicorn_lifecycle.layout import S, SlotState, slot_at
from gunicorn_lifecycle.protocol import Words
from gunicorn_lifecycle.statefile import open_for_reading

REPO = Path(__file__).resolve().parent.parent
APP = "example_app.app:app"
# The command, not `python -m gunicorn`, which cannot re-execute itself on USR2 (Gunicorn #3281).
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")

CONFIG = '''\
import os

bind = {bind!r}
workers = {workers!r}
control_socket_disable = True
graceful_timeout = 30
{settings}

{hooks}

_READY = {ready!r}
_inner_post_worker_init = globals().get("post_worker_init")


def post_worker_init(worker):
    if _inner_post_worker_init is not None:
        _inner_post_worker_init(worker)
    fd = os.open(_READY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b"%d\\n" % os.getpid())
    os.close(fd)
'''

PLUGIN_HOOKS = '''\
import gunicorn_lifecycle

gunicorn_lifecycle.configure({callbacks}**{options!r})

on_starting = gunicorn_lifecycle.on_starting
on_reload = gunicorn_lifecycle.on_reload
post_fork = gunicorn_lifecycle.post_fork
post_worker_init = gunicorn_lifecycle.post_worker_init
worker_exit = gunicorn_lifecycle.worker_exit
worker_abort = gunicorn_lifecycle.worker_abort
child_exit = gunicorn_lifecycle.child_exit
nworkers_changed = gunicorn_lifecycle.nworkers_changed
on_exit = gunicorn_lifecycle.on_exit
'''


def plugin_hooks(state_file: Path, code: dict[str, str] | None = None,
                 **options: float) -> str:
    """Config lines wiring gunicorn_lifecycle as the README says; ``code``: more arguments of
    configure(), each as the code of its value (callbacks: none by default)."""
    given = "".join(f"{name}={value}, " for name, value in (code or {}).items())
    return PLUGIN_HOOKS.format(callbacks=given, options={"state_file": str(state_file),
                                                         **options})


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.005)


class Gunicorn:
    """One Gunicorn instance serving the example app on a unix socket in ``directory``."""

    def __init__(self, directory: Path, *, workers: int, hooks: str = "",
                 settings: str = "", cpus: set[int] | None = None, app: str = APP) -> None:
        directory.mkdir(parents=True, exist_ok=False)
        self.directory = directory
        self.workers = workers
        self.socket = directory / "http.sock"
        self.log = directory / "gunicorn.log"
        self._ready = directory / "ready"
        self.config = directory / "gunicorn.conf.py"
        self.config.write_text(CONFIG.format(
            bind=f"unix:{self.socket}", workers=workers, settings=settings, hooks=hooks,
            ready=str(self._ready)))
        self._cpus = cpus
        self._app = app
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gunicorn:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [GUNICORN, "-c", str(self.config), self._app],
                cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=self._pin if self._cpus else None)
        return self

    def _pin(self) -> None:
        """In the child before exec (this process runs no threads): the master, so its workers."""
        assert self._cpus is not None
        os.sched_setaffinity(0, self._cpus)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("Gunicorn was not started")
        return self._proc.pid

    def ready(self, timeout: float = 60.0) -> list[int]:
        """Wait until every worker has booted; its pids, sorted."""
        def booted() -> list[int] | None:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"Gunicorn exited early: {self.log_tail()}")
            pids = children(self.pid)
            done = set(self._ready.read_text().split()) if self._ready.exists() else set()
            if len(pids) == self.workers and all(str(pid) in done for pid in pids):
                return pids
            return None

        try:
            return wait_for(booted, f"{self.workers} booted workers", timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; log: {self.log_tail()}") from None

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def running(self) -> bool:
        """Whether the master started here still runs (after USR2, the old one)."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful stop (SIGTERM to the master, which signals all workers together)."""
        os.kill(self.pid, signal.SIGTERM)
        assert self._proc is not None
        self._proc.wait(timeout)

    def kill(self) -> None:
        """Kill the whole session (master and workers), whatever state it is in."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._proc.wait()

    def log_tail(self, lines: int = 10) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Gunicorn's workers, for a master), sorted."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:  # gone, or gone between the open and the read (ESRCH)
        return []
    return sorted(int(child) for child in text.split())


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2 :].split()  # fields[0] is field 3, the state
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_exact(pid: int) -> float:
    """CPU seconds of every thread of a process, to the nanosecond (``/proc/<pid>/task/*/
    schedstat``: clock ticks are too coarse for a process that mostly sleeps)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def uss_bytes(pid: int) -> int:
    """Memory private to a process (Private_Clean + Private_Dirty in smaps_rollup)."""
    return _rollup(pid, "Private_Clean:", "Private_Dirty:")


def pss_bytes(pid: int) -> int:
    """Proportional memory: private pages, plus each shared page divided by its sharers."""
    return _rollup(pid, "Pss:")


def _rollup(pid: int, *fields: str) -> int:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(fields))


def state_words(state_file: Path) -> Words:
    """A read-only view of a running instance's state file, as the status command reads it."""
    return open_for_reading(str(state_file)).words


def registered_slots(words: Words) -> list[int]:
    """The indexes of the slots that hold a registered worker."""
    return [index for index in range(words.slots)
            if words[slot_at(index) + S.STATE] == SlotState.REGISTERED]


def heartbeat(words: Words, index: int) -> int:
    """The heartbeat stamp of slot ``index``: one word, read as a sweep reads it."""
    return words[slot_at(index) + S.HEARTBEAT]


def wait_beats(words: Words, indexes: list[int], timeout: float = 30.0) -> None:
    """Wait until the worker in each slot has beaten at least once more."""
    stamps = {index: heartbeat(words, index) for index in indexes}
    wait_for(lambda: all(heartbeat(words, index) != stamp for index, stamp in stamps.items()),
             f"a heartbeat in each of slots {indexes}", timeout)
