"""Benchmark 1: the CPU a heartbeat costs, per worker and interval.

The CPU of all workers over a fixed window, minus that of bare Gunicorn (same
app, same worker count, measured in the same repeat), divided by the
worker-intervals in the window. The interval is 10 ms so that the beats, not
Gunicorn's idle loop, dominate; ``failed`` is large so that nothing is lost.
The baseline is the naive tracker of :mod:`benchmarks.naive`, whose every beat
rewrites one shared JSON document under one lock. An idle thread, woken at the
same interval and doing nothing, shows the floor that any threaded heartbeat
pays for its wake-ups alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import naive
from .report import Budget, Row, Table, median
from .server import Gunicorn, children, cpu_seconds, plugin_hooks

INTERVAL = 0.01
FAILED = 60.0
FEW, MANY = 16, 64
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
    for repeat in range(repeats):
        order = RUNS if repeat % 2 == 0 else RUNS[::-1]  # cancel drift across the repeats
        rate = {(kind, workers): _cpu_rate(workdir / f"{repeat}-{kind}-{workers}", kind,
                                           workers, window)
                for kind, workers in order}
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
            Row(f"plugin vs naive, {FEW} workers", plugin_few, naive_few, "s",
                Budget("ratio", 1 / 20)),
            Row(f"plugin {MANY} vs {FEW} workers", plugin_many, plugin_few, "s",
                Budget("ratio", 1.5)),
            Row(f"idle thread vs naive, {FEW} workers (the floor)", idle_few, naive_few, "s"),
            Row(f"plugin vs idle thread, {FEW} workers", plugin_few, idle_few, "s"),
        ],
        [f"interval {INTERVAL * 1e3:g} ms, failed {FAILED:g} s, window {window:g} s, "
         f"median of {repeats} runs; CPU = utime+stime of all workers (/proc/<pid>/stat)",
         f"bare Gunicorn workers use {median(bare[FEW]) * 1e3:.1f} ms/s of CPU at {FEW} "
         f"workers, {median(bare[MANY]) * 1e3:.1f} ms/s at {MANY}"],
    )


def _cpu_rate(directory: Path, kind: str, workers: int, window: float) -> float:
    """CPU seconds per second used by all workers of one instance, once they have booted."""
    hooks = {
        "bare": "",
        "plugin": plugin_hooks(directory / "lifecycle.state", interval=INTERVAL, failed=FAILED),
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
    return (after - before) / elapsed
