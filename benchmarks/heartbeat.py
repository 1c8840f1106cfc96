"""Benchmark 1: the CPU a heartbeat costs, per worker and interval.

The CPU of all workers over a fixed window, minus that of bare Gunicorn (same
app, same worker count, measured in the same repeat), divided by the
worker-intervals in the window. The interval is 10 ms so that the beats, not
Gunicorn's idle loop, dominate. The budget is against the floor of any threaded
heartbeat: an idle thread woken at the same interval, doing nothing. The naive
tracker of :mod:`benchmarks.naive`, whose every beat rewrites one shared JSON
document under one lock, is shown beside it. No worker may be lost over the runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from gunicorn_lifecycle.layout import H, Reason

from . import naive
from .report import Budget, Row, Table, median
from .server import Gunicorn, children, cpu_seconds, plugin_hooks, state_words

INTERVAL = 0.01
FAILED = 1.0  # a hundred intervals: a healthy worker, late by a scheduling hiccup, is not lost
FEW, MANY = 16, 64
GROWTH = 1.25  # "no growth" from 16 to 64 workers, beyond this machine's run-to-run noise
RUNS = (("bare", FEW), ("plugin", FEW), ("naive", FEW), ("idle", FEW), ("bare", MANY),
        ("plugin", MANY))
IDLE_HOOKS = '''\
import _thread, time


def post_fork(server, worker):
    def idle():
        while True:
            time.sleep({interval!r})

    _thread.start_new_thread(idle, ())
'''


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    window = 1.0 if quick else 4.0
    costs: dict[tuple[str, int], list[float]] = {
        ("plugin", FEW): [], ("naive", FEW): [], ("idle", FEW): [], ("plugin", MANY): []}
    bare: dict[int, list[float]] = {FEW: [], MANY: []}
    lost = 0
    for repeat in range(repeats):
        order = RUNS if repeat % 2 == 0 else RUNS[::-1]  # cancel drift across the repeats
        rate: dict[tuple[str, int], float] = {}
        for kind, workers in order:
            rate[kind, workers], losses = _cpu_rate(workdir / f"{repeat}-{kind}-{workers}",
                                                    kind, workers, window)
            lost += losses
        for (kind, workers), found in costs.items():
            extra = rate[kind, workers] - rate["bare", workers]  # CPU seconds per second
            found.append(extra * INTERVAL / workers)
        for workers, found in bare.items():
            found.append(rate["bare", workers])
    plugin_few, naive_few = median(costs["plugin", FEW]), median(costs["naive", FEW])
    plugin_many, idle_few = median(costs["plugin", MANY]), median(costs["idle", FEW])
    return Table(
        "1. heartbeat CPU per worker-interval, above bare Gunicorn",
        [
            Row(f"plugin vs idle thread (the floor), {FEW} workers", plugin_few, idle_few, "s",
                Budget("ratio", 3.0)),
            Row(f"plugin {MANY} vs {FEW} workers (no growth)", plugin_many, plugin_few, "s",
                Budget("ratio", GROWTH)),
            Row("workers lost over all plugin runs (heartbeat)", lost, None, "x",
                Budget("value", 0)),
            Row(f"plugin vs naive, {FEW} workers", plugin_few, naive_few, "s"),
            Row(f"idle thread vs naive, {FEW} workers", idle_few, naive_few, "s"),
        ],
        [f"interval {INTERVAL * 1e3:g} ms, failed {FAILED:g} s, window {window:g} s, "
         f"median of {repeats} runs; CPU = utime+stime of all workers (/proc/<pid>/stat)",
         f"bare Gunicorn workers use {median(bare[FEW]) * 1e3:.1f} ms/s of CPU at {FEW} "
         f"workers, {median(bare[MANY]) * 1e3:.1f} ms/s at {MANY}"],
    )


# Where the plugin's cost sits: its heartbeat thread with parts of the beat taken away, patched
# into the worker from the bench config (run with `--only breakdown`).
PARTS = {
    "a beat that does nothing": "Worker.beat = lambda self: None\n",
    "one clock read and one store": ("def _stamp(self):\n"
                                     "    self._view[self._heartbeat_at] = time.monotonic_ns()\n"
                                     "Worker.beat = _stamp\n"),
    "the whole beat, sweeps taken away": "Worker._sweep = lambda self: None\n",
}


def breakdown(workdir: Path, repeats: int, quick: bool) -> Table:
    """The plugin's cost per worker-interval with parts of the beat taken away, against the
    idle thread and the whole plugin (same run)."""
    window = 1.0 if quick else 4.0
    kinds = ("bare", "idle", *PARTS, "plugin")
    costs: dict[str, list[float]] = {kind: [] for kind in kinds if kind != "bare"}
    for repeat in range(repeats):
        order = kinds if repeat % 2 == 0 else kinds[::-1]
        rate = {kind: _cpu_rate(workdir / f"{repeat}-{n}", kind, FEW, window)[0]
                for n, kind in enumerate(order)}
        for kind, found in costs.items():
            found.append((rate[kind] - rate["bare"]) * INTERVAL / FEW)
    idle = median(costs["idle"])
    return Table(
        "1b. where the heartbeat's cost sits, per worker-interval",
        [Row(kind, median(found), idle, "s") for kind, found in costs.items()],
        [f"{FEW} workers, interval {INTERVAL * 1e3:g} ms, median of {repeats} runs; baseline: "
         "the idle thread"])


def _cpu_rate(directory: Path, kind: str, workers: int, window: float) -> tuple[float, int]:
    """CPU seconds per second used by all workers of one instance, once they have booted;
    and the workers the plugin reported lost by heartbeat meanwhile."""
    plugin = plugin_hooks(directory / "lifecycle.state", interval=INTERVAL, failed=FAILED)
    if kind in PARTS:
        hooks = (f"{plugin}import time\nfrom gunicorn_lifecycle.worker import Worker\n"
                 f"{PARTS[kind]}")
    else:
        hooks = {
            "bare": "",
            "plugin": plugin,
            "naive": naive.hooks(directory / "naive.json", interval=INTERVAL, failed=FAILED),
            "idle": IDLE_HOOKS.format(interval=INTERVAL),
        }[kind]
    with Gunicorn(directory, workers=workers, hooks=hooks) as server:
        pids = server.ready()
        started, before = time.monotonic(), sum(cpu_seconds(pid) for pid in pids)
        time.sleep(window)  # the measurement window itself
        after, elapsed = sum(cpu_seconds(pid) for pid in pids), time.monotonic() - started
        if children(server.pid) != pids:
            raise RuntimeError(f"a {kind} worker was replaced during the window: "
                               f"{server.log_tail()}")
        lost = (state_words(directory / "lifecycle.state")[H.LOST_TALLY + Reason.HEARTBEAT]
                if kind == "plugin" or kind in PARTS else 0)
    return (after - before) / elapsed, lost
