"""Benchmark 2: the time spent inside gunicorn_lifecycle's hooks, with no user callbacks.

The bench config wraps each hook in a timer that appends one line per call to a
file (the append itself is outside the timed part); eight workers fork at once,
then all stop together on SIGTERM, so each hook includes the wait for the lock
that its siblings hold at the same moment. A worker's *boot share* is the
plugin's whole part of its boot: its ``post_fork`` plus its ``post_worker_init``.
The baseline is the same wrapper around a no-op hook: the cost of measuring.

Before ``post_fork`` runs, each fork runs the at-fork hooks of the modules the
master imported: filelock (4.x) registers some at import. What they cost a
worker is shown beside the budget: the time from the master's ``fork()`` to the
child's first line, and the pages the child has copied by then, with the imports
of a Gunicorn master, and those plus filelock.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from .report import Budget, Row, Table, Unit, median
from .server import Gunicorn, plugin_hooks

WORKERS = 8
BUDGETS = {"on_starting": 5e-3, "post_fork": None, "post_worker_init": None,
           "worker_exit": 1e-3, "child_exit": 0.5e-3}
CALLS = {"on_starting": 1, "post_fork": WORKERS, "post_worker_init": WORKERS,
         "worker_exit": WORKERS, "child_exit": WORKERS}
BOOT = ("post_fork", "post_worker_init")
BOOT_BUDGET = 1e-3

TIMER = '''\
import os as _os
import time as _time

_TIMES = {times!r}


def _noop(*args):
    return None


def _timed(name, hook):
    def timed(*args):
        started = _time.perf_counter()
        try:
            return hook(*args)
        finally:
            elapsed = _time.perf_counter() - started
            fd = _os.open(_TIMES, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o600)
            _os.write(fd, ("%s %d %r\\n" % (name, _os.getpid(), elapsed)).encode())
            _os.close(fd)
    # Gunicorn checks each hook's arity.
    if name == "on_starting":
        return lambda server: timed(server)
    if name == "post_worker_init":
        return lambda worker: timed(worker)
    return lambda server, worker: timed(server, worker)
'''


FORKS = 30
FORK = '''\
import os, statistics, sys, time
import gunicorn.arbiter, gunicorn.workers.sync
if sys.argv[1] == "filelock":
    import filelock


def faults():
    with open("/proc/self/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[7])


took, copied = [], []
for _ in range({forks}):
    read, write = os.pipe()
    began = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os.write(write, b"%d %d" % (time.perf_counter_ns() - began, faults()))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    ns, pages = os.read(read, 64).split()
    os.close(read)
    took.append(int(ns) / 1e9)
    copied.append(int(pages))
print(statistics.median(took), statistics.median(copied))
'''


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    plugin: dict[str, list[float]] = defaultdict(list)
    noop: dict[str, list[float]] = defaultdict(list)
    for repeat in range(repeats):
        for kind, found in (("plugin", plugin), ("noop", noop)):
            times = _hook_times(workdir / f"{repeat}-{kind}", kind)
            for hook in BUDGETS:
                found[hook].append(median(times[hook].values()))
            found["boot"].append(median(sum(times[hook][pid] for hook in BOOT)
                                        for pid in times[BOOT[0]]))
    forks = {imports: [_fork(imports) for _ in range(repeats)] for imports in ("bare", "filelock")}
    return Table(
        f"2. hook latency, no user callbacks ({WORKERS} workers forked and stopped together)",
        [Row("worker boot share: post_fork + post_worker_init", median(plugin["boot"]),
             median(noop["boot"]), "s", Budget("value", BOOT_BUDGET)),
         *(Row(hook, median(plugin[hook]), median(noop[hook]), "s",
               None if limit is None else Budget("value", limit))
           for hook, limit in BUDGETS.items()),
         *(Row(f"fork to the child's first line, {what}: with filelock vs without",
               median(run[n] for run in forks["filelock"]),
               median(run[n] for run in forks["bare"]), unit)
           for n, (what, unit) in enumerate(_FORK_FIGURES))],
        [f"median per call (boot share: per worker), median of {repeats} runs; baseline: the "
         "same timer around a no-op",
         f"fork: median of {FORKS} forks of a process with a Gunicorn master's imports, one at "
         f"a time, median of {repeats} runs"],
    )


_FORK_FIGURES: tuple[tuple[str, Unit], ...] = (("time", "s"), ("pages copied", "x"))


def _fork(imports: str) -> tuple[float, float]:
    """Seconds from ``fork()`` to the child's first line, and the pages it copied by then."""
    out = subprocess.run([sys.executable, "-c", FORK.format(forks=FORKS), imports],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def _hook_times(directory: Path, kind: str) -> dict[str, dict[int, float]]:
    """Start and stop one instance; the duration of each timed hook's call, by process
    (the master's calls of ``child_exit``, one per worker, by the worker's order)."""
    times = directory / "hook-times"
    timer = TIMER.format(times=str(times))
    if kind == "plugin":
        hooks = plugin_hooks(directory / "lifecycle.state") + timer + "".join(
            f"{hook} = _timed({hook!r}, {hook})\n" for hook in BUDGETS)
    else:
        hooks = timer + "".join(f"{hook} = _timed({hook!r}, _noop)\n" for hook in BUDGETS)
    with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
        server.ready()
        server.stop()
    found: dict[str, dict[int, float]] = defaultdict(dict)
    for line in times.read_text().splitlines():
        hook, pid, elapsed = line.split()
        calls = found[hook]
        calls[int(pid) if hook in BOOT or hook == "worker_exit" else len(calls)] = float(elapsed)
    for hook, expected in CALLS.items():
        if len(found[hook]) != expected:
            raise RuntimeError(f"{kind}: {hook} ran {len(found[hook])} times, not {expected}: "
                               f"{server.log_tail()}")
    return found
