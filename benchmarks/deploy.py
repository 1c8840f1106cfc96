"""Benchmark 6: requests during deploys, and the health probe's latency.

Each deploy runs under the same load (client threads in this process, one
connection per request, every latency and failure kept), against two ways of
doing it in the same run:

- the plugin: ``gunicorn-lifecycle upgrade`` (and ``reload``), which wait on the
  state file until the new generation is ready;
- bare Gunicorn driven by hand, as deploy scripts do: ``USR2``, a fixed sleep,
  ``TERM`` to the old master (``HUP`` and a fixed sleep for a reload).

Then ``gunicorn-lifecycle check``'s wall time, against starting the same Python,
with the package's bytecode cached as an installed package has it (``pip install``
compiles it; an editable install run under ``PYTHONDONTWRITEBYTECODE`` would
compile every module at every probe).
"""

from __future__ import annotations

import compileall
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gunicorn_lifecycle

from .load import request
from .report import Budget, Row, Table, median
from .server import Gunicorn, plugin_hooks, wait_for

WORKERS = 2
CLIENTS = 4
SLEEP = 5.0  # the hand-driven deploy's fixed wait for the new workers
WINDOW = SLEEP + 3.0  # seconds of load from each deploy's start
LIFECYCLE = str(Path(sys.executable).parent / "gunicorn-lifecycle")


class Load:
    """Client threads sending requests until stopped; their latencies and failures."""

    def __init__(self, path: Path) -> None:
        self.latencies: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(str(path),))
                         for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _run(self, path: str) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            ok = request(path)
            self.latencies.append(time.monotonic() - began)
            self.failed += not ok

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(len(ordered) * 0.99)]


def _deploy(server: Gunicorn, kind: str, how: str) -> None:
    """One upgrade or reload of a ready ``server``, the plugin's way or by hand."""
    if kind == "plugin":
        done = subprocess.run([LIFECYCLE, how, "--state", str(server.directory / "lifecycle.state"),
                               "--timeout", "60"], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{how} failed: {done.stderr.strip()}; {server.log_tail()}")
        return
    if how == "reload":
        server.signal(signal.SIGHUP)
        time.sleep(SLEEP)
        return
    server.signal(signal.SIGUSR2)
    time.sleep(SLEEP)
    server.signal(signal.SIGTERM)
    wait_for(lambda: not server.running(), "the old master to exit", 60)


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    repeats = 1 if quick else min(repeats, 3)
    figures: dict[tuple[str, str], list[Load]] = {}
    durations: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats):
        for how in ("upgrade", "reload"):
            order = ("bare", "plugin") if repeat % 2 == 0 else ("plugin", "bare")
            for kind in order:
                directory = workdir / f"{repeat}-{how}-{kind}"
                hooks = plugin_hooks(directory / "lifecycle.state") if kind == "plugin" else ""
                with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
                    server.ready()
                    load = Load(server.socket)
                    began = time.monotonic()
                    try:
                        _deploy(server, kind, how)
                        durations.setdefault((how, kind), []).append(time.monotonic() - began)
                        # the same window for both ways: a quick deploy has fewer calm requests
                        time.sleep(max(began + WINDOW - time.monotonic(), 0))
                    finally:
                        figures.setdefault((how, kind), []).append(load.stop())
    rows = []
    for how in ("upgrade", "reload"):
        plugin, bare = figures[(how, "plugin")], figures[(how, "bare")]
        rows += [
            Row(f"{how}: failed requests", sum(x.failed for x in plugin),
                sum(x.failed for x in bare), "x", Budget("value", 0)),
            Row(f"{how}: p99 latency", median(x.p99 for x in plugin),
                median(x.p99 for x in bare), "s", Budget("gain", 2.0)),
            Row(f"{how}: duration", median(durations[(how, "plugin")]),
                median(durations[(how, "bare")]), "s"),
        ]
    rows += _edges(workdir / "edges")
    rows.append(_check(workdir / "check", 1 if quick else 21))
    return Table(
        "6. deploys under load, and the health probe",
        rows,
        [f"{WORKERS} sync workers, {CLIENTS} clients, one connection per request; {repeats} "
         f"deploys of each kind and way; p99 over {WINDOW:g} s of load from each deploy's "
         "start, median over the deploys; duration: until the command (or the old master) "
         "ended",
         f"baseline: bare Gunicorn by hand (USR2, sleep {SLEEP:g} s, TERM; HUP, sleep "
         f"{SLEEP:g} s); failed requests summed over the deploys",
         "edges: upgrade twice in a row (exit 0 both), to a release whose /healthz answers 500 "
         "(warmup, exit 1 rolled back), and one whose new master is killed while its workers "
         "boot (exit 1 rolled back), under the same load; expected: what each says it did",
         "check: median wall time of `gunicorn-lifecycle check` on a ready instance (bytecode "
         "compiled, as installed), against `python -c pass` (the interpreter's own start)"],
    )


def _edges(directory: Path) -> list[Row]:
    """The deploys an orchestrator meets at the edges, one server, under load."""
    broken, slow = directory.parent / "broken", directory.parent / "slow-boot"
    os.environ.update(BENCH_BROKEN=str(broken), BENCH_SLOW_BOOT=str(slow))
    state = directory / "lifecycle.state"
    hooks = plugin_hooks(state, {"warmup": "'/healthz'"}, interval=0.5, failed=1.0)
    outcomes: list[tuple[str, bool, int]] = []
    with Gunicorn(directory, workers=WORKERS, hooks=hooks, app="benchmarks.health_app:app"
                  ) as server:
        server.ready()
        load = Load(server.socket)
        try:
            for _ in range(2):
                done = _upgrade(state)
                outcomes.append(("upgrade twice in a row", done.returncode == 0 and
                                 done.stdout.startswith("upgraded: "), done.returncode))
            broken.touch()
            done = _upgrade(state)
            outcomes.append(("upgrade to a release whose /healthz answers 500",
                             done.returncode == 1 and "rolled back: " in done.stderr,
                             done.returncode))
            broken.unlink()
            slow.write_text("30")
            upgrading = subprocess.Popen([LIFECYCLE, "upgrade", "--state", str(state),
                                          "--timeout", "60"], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
            old = _newest(state)
            new = wait_for(lambda: (pid := _newest(state)) != old and pid,
                           "the new master's generation open", 30)
            os.kill(new, signal.SIGKILL)  # while its workers boot
            _, err = upgrading.communicate(timeout=60)
            outcomes.append(("upgrade whose new master is killed while booting",
                             upgrading.returncode == 1 and "rolled back: " in err,
                             upgrading.returncode))
        finally:
            slow.unlink(missing_ok=True)
            stopped = load.stop()
    rows = [Row(f"edges: {what}: exit {code}, as expected", int(expected), None, "x",
                Budget("value", 1, at_least=True)) for what, expected, code in outcomes]
    return [*rows, Row("edges: failed requests", stopped.failed, None, "x", Budget("value", 0))]


def _upgrade(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIFECYCLE, "upgrade", "--state", str(state), "--timeout", "60"],
                          capture_output=True, text=True, timeout=120)


def _newest(state: Path) -> int:
    from gunicorn_lifecycle.deploy import newest
    from gunicorn_lifecycle.status import read_status

    gen = newest(read_status(str(state)))
    return int(gen["master_pid"]) if gen else 0


def _check(directory: Path, repeats: int) -> Row:
    if not compileall.compile_dir(Path(gunicorn_lifecycle.__file__).parent, quiet=1):
        raise RuntimeError("could not compile gunicorn_lifecycle's bytecode")
    with Gunicorn(directory, workers=WORKERS,
                  hooks=plugin_hooks(directory / "lifecycle.state")) as server:
        server.ready()
        state = str(directory / "lifecycle.state")
        probe = [LIFECYCLE, "check", "--state", state]
        wait_for(lambda: subprocess.run(probe, capture_output=True).returncode == 0,
                 "the instance ready", 30)
        checks, starts = [], []
        for _ in range(repeats):
            checks.append(_timed(probe))
            starts.append(_timed([sys.executable, "-c", "pass"]))
    return Row("check: wall time", median(checks), median(starts), "s", Budget("value", 0.1))


def _timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - began
