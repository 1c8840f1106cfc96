"""Benchmark 3: requests per second of the example app, with and without the plugin.

The same load generator (:mod:`benchmarks.load`, a process of its own) drives
bare Gunicorn and Gunicorn with the plugin at its default 10 s heartbeat. Rounds
alternate bare/plugin, and swap which goes first in every other pair, so that a
drift of the machine's speed falls on both alike. A full round outlasts one
interval, so each worker beats (and one sweeps) inside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .report import Budget, Row, Table, median
from .server import REPO, Gunicorn, plugin_hooks

WORKERS = 2
THREADS = 4


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    seconds = 1.0 if quick else 11.0
    rates: dict[str, list[float]] = {"bare": [], "plugin": []}
    for repeat in range(repeats):
        order = ("bare", "plugin") if repeat % 2 == 0 else ("plugin", "bare")
        for kind in order:
            rates[kind].append(_rate(workdir / f"{repeat}-{kind}", kind, seconds))
    return Table(
        "3. request throughput, example app",
        [Row("plugin vs bare Gunicorn", median(rates["plugin"]), median(rates["bare"]),
             "req/s", Budget("ratio", 0.99, at_least=True))],
        [f"{WORKERS} sync workers, {THREADS} client threads in one process, one connection "
         f"per request, {seconds:g} s rounds, median of {repeats} rounds each",
         "rounds, bare: " + " ".join(f"{r:.0f}" for r in rates["bare"])
         + "; plugin: " + " ".join(f"{r:.0f}" for r in rates["plugin"])],
    )


def _rate(directory: Path, kind: str, seconds: float) -> float:
    """Requests per second that one instance served to the load generator."""
    hooks = plugin_hooks(directory / "lifecycle.state") if kind == "plugin" else ""
    with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
        server.ready()
        load = subprocess.run(
            [sys.executable, "-m", "benchmarks.load", str(server.socket),
             "--seconds", str(seconds), "--threads", str(THREADS)],
            cwd=REPO, capture_output=True, check=True, text=True, timeout=seconds + 60)
    result = json.loads(load.stdout)
    if result["failed"] or not result["requests"]:
        raise RuntimeError(f"{kind}: {result['failed']} failed requests, "
                           f"{result['requests']} served: {server.log_tail()}")
    return float(result["requests"]) / float(result["seconds"])
