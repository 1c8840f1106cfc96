"""Benchmark 8: how long a node is without a leader when leadership moves (SPEC section 10).

At ``interval=10`` (the default heartbeat), three workers, leader callbacks that
record when they ran:

- **kill -9 of the leader**: from the kill to the next ``leader_start``;
- **reload**: ``HUP``; from the old leader's ``leader_stop`` to the new
  generation's ``leader_start``.

A successor used to wait for its next beat (up to the interval); its heartbeat is
now woken by the election. Budget (issue 22): under a second. The baseline is
the interval, what the wait for a beat would cost at worst.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .report import Budget, Row, Table, median
from .server import Gunicorn, plugin_hooks, wait_for

INTERVAL = 10.0
RECORDER = '''\
import json as _json, os as _os, time as _time


def _leader(name):
    def callback(event):
        fd = _os.open({record!r}, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o600)
        _os.write(fd, (_json.dumps({{"cb": name, "pid": _os.getpid(), "term": event.term,
                                     "t": _time.monotonic()}}) + "\\n").encode())
        _os.close(fd)
    return callback
'''


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    killed, reloaded = [], []
    for repeat in range(repeats):
        killed.append(_gap(workdir / f"{repeat}-kill", "kill"))
        reloaded.append(_gap(workdir / f"{repeat}-reload", "reload"))
    return Table(
        f"8. leadership gap at interval={INTERVAL:g}",
        [Row("kill -9 of the leader: to the next leader_start (worst)", max(killed), INTERVAL,
             "s", Budget("value", 1.0)),
         Row("kill -9 of the leader: median", median(killed), INTERVAL, "s"),
         Row("reload: leader_stop to the next leader_start (worst)", max(reloaded), INTERVAL,
             "s", Budget("value", 1.0)),
         Row("reload: median", median(reloaded), INTERVAL, "s")],
        [f"{repeats} runs of each, 3 workers; baseline: the interval, the wait for a beat"],
    )


def _gap(directory: Path, how: str) -> float:
    record = directory.parent / f"{directory.name}.jsonl"
    hooks = RECORDER.format(record=str(record)) + plugin_hooks(
        directory / "lifecycle.state",
        {"leader_start": "_leader('leader_start')", "leader_stop": "_leader('leader_stop')"},
        interval=INTERVAL, failed=5.0)

    def events(name: str) -> list[dict[str, float]]:
        lines = record.read_text().splitlines() if record.exists() else []
        return [e for e in map(json.loads, lines) if e["cb"] == name]

    with Gunicorn(directory, workers=3, hooks=hooks) as server:
        server.ready()
        first = wait_for(lambda: events("leader_start"), "the first leader_start")[0]
        if how == "kill":
            began = time.monotonic()
            os.kill(int(first["pid"]), signal.SIGKILL)
        else:
            server.signal(signal.SIGHUP)
            began = wait_for(lambda: events("leader_stop"), "the old leader's leader_stop",
                             timeout=60)[0]["t"]
        second = wait_for(lambda: [e for e in events("leader_start")
                                   if e["term"] > first["term"]], "the next leader_start",
                          timeout=60)[0]
    return second["t"] - began
