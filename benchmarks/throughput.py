"""Benchmark 3: requests per second of the example app, with and without the plugin.

On this noisy 2-core machine, rounds run one after the other differ by 10-15 %,
even back to back, so bare and plugin Gunicorn are loaded *at the same time*:
both instances share one CPU, their two load generators (:mod:`benchmarks.load`,
same code, same window on the system-wide monotonic clock) share the other.
Whatever slows the machine slows both, and each burst gives one paired ratio.
Which instance starts first alternates per repeat (the first one gains about
0.4 % in an A/A test). Instances live for several heartbeat intervals (the
default 10 s), so the plugin's workers beat, and one sweeps, during the bursts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from .report import Budget, Row, Table, median
from .server import REPO, Gunicorn, plugin_hooks

WORKERS = 2
THREADS = 4
CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPUS, CLIENT_CPUS = ({CPUS[-1]}, [CPUS[0]]) if len(CPUS) > 1 else (None, [])
LEAD = 0.5  # seconds for both generators to start and warm up before the window opens


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    bursts, seconds = (1, 1.0) if quick else (5, 2.0)
    rates: dict[str, list[float]] = {"bare": [], "plugin": []}
    ratios: list[float] = []
    for repeat in range(repeats):
        order = ("bare", "plugin") if repeat % 2 == 0 else ("plugin", "bare")
        with ExitStack() as stack:
            servers = {kind: stack.enter_context(_instance(workdir / f"{repeat}-{kind}", kind))
                       for kind in order}
            for server in servers.values():
                server.ready()
            for _ in range(bursts):
                served = _burst(servers, seconds)
                for kind, rate in served.items():
                    rates[kind].append(rate)
                ratios.append(served["plugin"] / served["bare"])
    quartiles = sorted(ratios)[len(ratios) // 4], sorted(ratios)[(3 * len(ratios)) // 4]
    return Table(
        "3. request throughput, example app, bare and plugin loaded together",
        [Row("plugin vs bare Gunicorn", median(rates["plugin"]), median(rates["bare"]),
             "req/s", Budget("ratio", 0.99, at_least=True), paired_ratio=median(ratios))],
        [f"{WORKERS} sync workers each, both instances on CPU {SERVER_CPUS}, {THREADS} client "
         f"threads per generator on CPU {CLIENT_CPUS}, one connection per request",
         f"{bursts} bursts of {seconds:g} s per repeat, {repeats} repeats; req/s per instance "
         f"(each has half the machine); ratio = median of {len(ratios)} paired bursts, "
         f"quartiles {quartiles[0]:.3f}..{quartiles[1]:.3f}"],
    )


def _instance(directory: Path, kind: str) -> Gunicorn:
    hooks = plugin_hooks(directory / "lifecycle.state") if kind == "plugin" else ""
    return Gunicorn(directory, workers=WORKERS, hooks=hooks, cpus=SERVER_CPUS)


def _burst(servers: dict[str, Gunicorn], seconds: float) -> dict[str, float]:
    """Load every instance over the same window; requests per second each served."""
    begin = time.monotonic() + LEAD
    command = [sys.executable, "-m", "benchmarks.load", "--seconds", str(seconds),
               "--begin", repr(begin), "--threads", str(THREADS),
               *(f"--cpu={cpu}" for cpu in CLIENT_CPUS)]
    with ExitStack() as stack:
        loads = {kind: stack.enter_context(subprocess.Popen(
                     [*command, str(server.socket)], cwd=REPO, stdout=subprocess.PIPE,
                     text=True))
                 for kind, server in servers.items()}
        served = {}
        for kind, load in loads.items():
            output, _ = load.communicate(timeout=LEAD + seconds + 60)
            if load.returncode:
                raise RuntimeError(f"{kind}: the load generator exited {load.returncode}")
            result = json.loads(output)
            if result["failed"] or not result["requests"]:
                raise RuntimeError(f"{kind}: {result['failed']} failed requests, "
                                   f"{result['requests']} served: {servers[kind].log_tail()}")
            served[kind] = float(result["requests"]) / float(result["seconds"])
    return served
