"""Real Gunicorn masters and workers for the tests, and ways to wait on them.

Every callback of the generated config appends one JSON line to a record file,
with the event's fields and the pid of the process that ran it; the tests read
that record. Nothing of Gunicorn is mocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

REPO = Path(__file__).resolve().parent.parent
# The console script, not `python -m gunicorn`: a USR2 re-exec of the latter runs gunicorn's
# __main__.py as a script, with gunicorn's own folder first on sys.path (its `http` package
# then hides the standard library's, and gevent fails to import).
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
CALLBACKS = ("master_start", "master_exit", "master_ready", "worker_start", "worker_exit",
             "worker_lost")
LEADER = ("leader_start", "leader_stop")
HOOKS = ("on_starting", "on_reload", "post_fork", "post_worker_init", "worker_exit",
         "worker_abort", "child_exit", "nworkers_changed", "on_exit")

CONF = '''\
{first}
import json, os, subprocess, threading, time
import gunicorn_lifecycle

RECORD = {record!r}
RAISE = {raising!r}
BLOCK = {block!r}
HOLD = {hold!r}
SLEEP = {sleep!r}
PROBE = {probe!r}

def _blocked(path):
    with open(path) as status:
        return next(line.split()[1] for line in status if line.startswith("SigBlk:"))

def _record(name):
    def callback(event):
        line = json.dumps({{
            "cb": name, "id": event.id, "n_prev": event.n_prev, "n_mine": event.n_mine,
            "n_next": event.n_next, "reason": event.reason, "generation": event.generation,
            "pid": event.pid, "in_pid": os.getpid(), "t": time.monotonic(),
            "has_server": event.server is not None, "has_worker": event.worker is not None,
            "term": event.term, "in_main": threading.get_ident() == threading.main_thread().ident,
            **({{"sigblk": _blocked("/proc/thread-self/status"),  # of the thread, of a child
                "child_sigblk": subprocess.run(["grep", "SigBlk", "/proc/self/status"],
                                               capture_output=True, text=True).stdout.split()[1]}}
               if PROBE else {{}}),
        }})
        fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (line + "\\n").encode())
        os.close(fd)
        if name in BLOCK:  # block once, in the first process that gets here
            try:
                os.close(os.open(RECORD + "." + name, os.O_CREAT | os.O_EXCL))
                time.sleep(BLOCK[name])
            except FileExistsError:
                pass
        if name in HOLD:  # hold the GIL once, in C (no switch point), as a C extension does;
            try:  # when it let go is written to RECORD.held.<name>
                fd = os.open(RECORD + ".held." + name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                began = time.perf_counter()
                sum(range(10**6))
                sum(range(int(HOLD[name] * 10**6 / (time.perf_counter() - began))))
                os.write(fd, repr(time.monotonic()).encode())
                os.close(fd)
            except FileExistsError:
                pass
        if name in SLEEP:  # every call, in every process: a callback that takes its time
            time.sleep(SLEEP[name])
        if name in RAISE:
            raise RuntimeError("callback %s raised on purpose" % name)
    return callback

{configure}

bind = {bind!r}
workers = {workers!r}
control_socket = {control!r}  # Gunicorn 25+'s control socket stays on, as users run it
graceful_timeout = 10
{settings}
{hooks}
'''


def gunicorn_release(version: str) -> Path:
    """A directory holding Gunicorn ``version`` alone, installed once beside this venv.

    Put first on PYTHONPATH, it is the Gunicorn the console script imports (and a
    USR2 re-exec too: it inherits the environment).
    """
    target = Path(sys.prefix) / f"gunicorn-{version}"
    with filelock.FileLock(f"{target}.lock"):  # the suite's processes install it once
        if not (target / "gunicorn").is_dir():
            partial = Path(f"{target}.partial")
            shutil.rmtree(partial, ignore_errors=True)  # an install cut short before
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                            "--disable-pip-version-check", "--target", str(partial),
                            f"gunicorn=={version}"], check=True, timeout=300)
            partial.rename(target)
    return target


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def booted(state_file: str, workers: int | None = None) -> bool:
    """Every registered worker has booted; with ``workers``, in one generation of that many."""
    from gunicorn_lifecycle.status import read_status

    if not os.path.exists(state_file):
        return False
    generations = read_status(state_file)["generations"]
    registered = [w for g in generations for w in g["workers"] if not w["lost"]]
    if workers is not None and (len(generations), len(registered)) != (1, workers):
        return False
    return all(w["booted"] for w in registered)


class Server:
    """One Gunicorn instance (and any master it re-executes), run from a generated config."""

    def __init__(self, directory: Path, *, workers: int = 2, settings: str = "",
                 raising: tuple[str, ...] = (), block: dict[str, float] | None = None,
                 hooks: tuple[str, ...] = HOOKS, record: bool = True, gunicorn: str | None = None,
                 first: str = "", probe: bool = False, leader: bool = False,
                 hold: dict[str, float] | None = None, sleep: dict[str, float] | None = None,
                 **options: Any) -> None:
        """``record``: configure() with a recording callback for every event (else the
        ``settings`` call configure() themselves, as README's recipes do). ``gunicorn``: a
        Gunicorn version to run instead of the installed one. ``first``: the config's first
        lines. ``probe``: each callback also records the signals blocked in its thread and
        in a process it starts. ``leader``: record leader_start and leader_stop too.
        ``hold``: the first call of each named callback holds the GIL that many seconds.
        ``sleep``: every call of each named callback sleeps that many seconds."""
        self.env = {"PYTHONPATH": os.pathsep.join(
            [str(gunicorn_release(gunicorn)), *filter(None, [os.environ.get("PYTHONPATH")])])
        } if gunicorn else {}
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.record = directory / "events.jsonl"
        self.log = directory / "gunicorn.log"
        self.sock = str(directory / "http.sock")
        self.state_file = str(options.setdefault("state_file", str(directory / "lifecycle.state")))
        options.setdefault("interval", 0.5)
        options.setdefault("failed", 0.5)
        self.conf = directory / "gunicorn.conf.py"
        self.conf.write_text(CONF.format(
            first=first, probe=probe, record=str(self.record), raising=raising,
            block=block or {}, hold=hold or {}, sleep=sleep or {},
            configure=(f"gunicorn_lifecycle.configure(**{{**{{name: _record(name) for name in "
                       f"{CALLBACKS + LEADER * leader!r}}}, **{options!r}}})" if record
                       else ""),
            bind=f"unix:{self.sock}", control=str(directory / "ctl.sock"), workers=workers,
            settings=settings,
            hooks="\n".join(f"{h} = gunicorn_lifecycle.{h}" for h in hooks)))
        self.record.touch(mode=0o666)  # writable by workers that dropped privileges
        self.record.chmod(0o666)
        self.proc: subprocess.Popen[bytes] | None = None
        self.app = "example_app.app:app"
        self.pythonpath = REPO  # where the app is imported from

    def start(self, wait_workers: int | None = None, prefix: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> Server:
        """Run Gunicorn (behind the ``prefix`` command, if any); wait for its first workers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, GUNICORN, "-c", str(self.conf), "--pythonpath", str(self.pythonpath),
                 self.app],
                cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, **(env or {})}, start_new_session=True)
        if wait_workers:
            self.wait_count("worker_start", wait_workers)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # observing

    def events(self, cb: str | None = None, **match: Any) -> list[dict[str, Any]]:
        try:
            lines = self.record.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in found if (cb is None or e["cb"] == cb)
                and all(e.get(k) == v for k, v in match.items())]

    def wait_count(self, cb: str, count: int, timeout: float = 15.0,
                   **match: Any) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events match, then return them all."""
        self._wait(lambda: len(self.events(cb, **match)) >= count,
                   f"{count} {cb} events matching {match}", timeout)
        return self.events(cb, **match)

    def wait_registered(self, workers: int) -> list[int]:
        """Wait until ``workers`` workers are registered (not lost), booted or not; their pids,
        oldest first. A worker registers in ``post_fork``; its ``worker_start`` comes once it
        has loaded the application (``post_worker_init``)."""
        from states import registered

        return sorted(self._wait(lambda: os.path.exists(self.state_file) and (
            found := registered(self.state_file)) and len(found) >= workers and found,
            f"{workers} workers registered"))

    def wait_booted(self, workers: int | None = None) -> None:
        """Wait until every started worker that is still registered has booted.

        A worker signalled before it installs its handlers (in Gunicorn's
        init_process) never sees the signal: tests stop a server only once its
        workers are up, as an operator would. With ``workers``, also wait until
        the state holds a single generation with that many workers (a reload or
        an upgrade has settled, every new worker is registered).
        """
        self._wait(lambda: booted(self.state_file, workers), "the workers to boot"
                   if workers is None else f"one generation of {workers} booted workers")

    def wait_settled(self) -> None:
        """Wait until the workers booted, each ready generation's master_ready was told, and
        the turn and the lock are free: a worker stopped now holds neither."""
        from states import header_word

        from gunicorn_lifecycle.layout import H
        from gunicorn_lifecycle.status import read_status

        def free() -> bool:
            with open(self.state_file, "rb") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
            return header_word(self.state_file, H.SERVING) == header_word(self.state_file,
                                                                          H.NEXT_TICKET)

        self.wait_booted()
        self._wait(lambda: {g["generation"] for g in read_status(self.state_file)["generations"]
                            if g["ready"]} <= {e["generation"] for e in
                                              self.events("master_ready")} and free(),
                   "every ready generation's master_ready told, the turn and the lock free")

    def _wait(self, condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        """wait_for, with Gunicorn's log as it is when the wait fails."""
        try:
            return wait_for(condition, what, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- gunicorn log:\n{self.log_tail(40)}") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def live_workers(self, master: int) -> list[int]:
        """The pids whose parent is ``master``, from /proc."""
        children = Path(f"/proc/{master}/task/{master}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:  # gone, or gone between the open and the read (ESRCH)
            return []

    def request(self, path: str = "/") -> bytes:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(self.sock)
            client.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    # acting

    def signal(self, sig: int, pid: int | None = None) -> None:
        os.kill(self.pid if pid is None else pid, sig)

    def wait_exit(self, pid: int | None = None, timeout: float = 20.0) -> None:
        target = self.pid if pid is None else pid
        if target == self.pid:
            assert self.proc is not None
            proc = self.proc
            self._wait(lambda: proc.poll() is not None, f"master {target} to exit", timeout)
        else:
            self._wait(lambda: not alive(target), f"process {target} to exit", timeout)

    def stop(self) -> None:
        if os.path.exists(self.state_file):
            self.wait_booted()
        self.signal(signal.SIGTERM)
        self.wait_exit()

    def kill_all(self) -> None:
        """Tear down: every process of the instance's session, whatever state it is in."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()


class Load:
    """Client threads sending requests, one connection each: ``each`` apiece, or until stopped.

    Every latency is kept, and every request that failed or did not answer 200.
    """

    def __init__(self, s: Server, clients: int = 4, each: int | None = None) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s, each))
                         for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, s: Server, each: int | None) -> None:
        sent = 0
        while not self._stop.is_set() and sent != each:
            began = time.monotonic()
            try:
                status = s.request().split(b"\r\n", 1)[0]  # HTTP/1.0 or 1.1 (uvicorn)
                if status.split()[1:2] != [b"200"]:
                    self.failures.append(f"not 200: {status!r}")
            except OSError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - began)
            sent += 1

    def stop(self) -> Load:
        """Stop sending (if not done already) and wait for the clients."""
        self._stop.set()
        return self.join()

    def join(self) -> Load:
        for thread in self._threads:
            thread.join()
        return self


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0
        ) -> subprocess.CompletedProcess[str]:
    """Run ``gunicorn-lifecycle`` as an operator would; its outcome, output as text."""
    return subprocess.run([sys.executable, "-m", "gunicorn_lifecycle", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command's outcome: its last line on stderr (a line per step of progress comes
    before it, all prefixed), nothing on stdout; without the prefix."""
    lines = done.stderr.strip().splitlines()
    assert done.stdout == "" and lines, done
    assert all(line.startswith("gunicorn-lifecycle: ") for line in lines), done.stderr
    return lines[-1].removeprefix("gunicorn-lifecycle: ")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (read from ``/proc`` here, not through
    the library under test)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone: no entry, or it vanished between the open and the read (ESRCH)
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def check_record(events: list[dict[str, Any]], closed: bool = True,
                 lineage: Callable[[int], Any] = lambda generation: generation) -> None:
    """Replay the record (written in turn, so in delivery order) and check every count.

    Each event's n_prev, n_mine and n_next must equal what the events before it
    imply, ``lineage`` ordering the generations; each generation gets exactly
    one master_start and at most one master_exit (with no worker left, but for
    a master that died: its orphans keep counting, and their generation stays
    present until they are gone), and at most one master_ready in between, with
    its master_start's reason; each worker one end (worker_exit or worker_lost) per start
    (a resumed worker starts again), all ended when ``closed``.
    """
    announced: set[int] = set()
    closed_generations: set[int] = set()
    started: dict[int, str] = {}  # generation -> its master_start's reason
    ready: set[int] = set()
    live: dict[int, int] = {}  # generation -> counted workers
    active: set[str] = set()  # workers started and not ended
    for n, e in enumerate(events):
        g, cb = e["generation"], e["cb"]
        where = f"event #{n} {e}"
        if cb == "master_start":
            assert g not in announced and g not in closed_generations and e["id"] == str(g), where
            announced.add(g)
            started[g] = e["reason"]
            live[g] = 0
        assert g in announced or live.get(g), f"{where}: generation {g} is not present"
        if cb == "worker_start":
            assert e["id"] == f"{g}-{e['pid']}" and e["id"] not in active, where
            assert (e["reason"] == "resume") == (e["id"] in {x["id"] for x in events[:n]}), where
            active.add(e["id"])
            live[g] += 1
        if cb == "master_ready":
            assert g in announced and g not in ready and e["id"] == str(g), f"{where}: once"
            assert e["reason"] == started[g], f"{where}: reason of its master_start"
            ready.add(g)
        expected_mine = live[g]
        if cb in ("worker_exit", "worker_lost"):
            assert e["id"] in active, f"{where}: ended twice, or never started"
            active.remove(e["id"])
            live[g] -= 1
            if cb == "worker_lost":
                expected_mine = live[g]
        if cb == "master_start":
            expected_mine = 0
        present = [k for k in live if k in announced or live[k]]
        older = [k for k in present if lineage(k) < lineage(g)]
        newer = [k for k in present if lineage(k) > lineage(g)]
        assert e["n_mine"] == expected_mine, f"{where}: n_mine should be {expected_mine}"
        assert e["n_prev"] == (live[max(older, key=lineage)] if older else None), f"{where}: n_prev"
        assert e["n_next"] == (live[min(newer, key=lineage)] if newer else None), f"{where}: n_next"
        if cb == "master_exit":
            assert g in announced, f"{where}: closed twice"
            died = e["in_pid"] != e["pid"]  # closed by whoever found its master dead
            assert died or live[g] == 0, f"{where}: closed with live workers"
            announced.remove(g)
            closed_generations.add(g)
    if closed:
        assert not active, f"workers never ended: {active}"
