"""Benchmark 7: the turn, user callbacks one at a time node-wide (SPEC section 6).

- **Eight exits at once.** Eight workers stop together, each with a ``worker_exit``
  callback that records how long it ran. A worker's *plugin time* is its
  ``worker_exit`` hook's time less its own callback's: its bookkeeping, and its
  wait for the others' turns. The baseline is bare Gunicorn's same timer around a
  no-op hook. Budget: the median of each round within 1 ms.
- **Handover.** The same eight exits with callbacks that each take 20 ms: the
  gap from one callback's end to the next one's start, the idle time of the
  turn while callbacks wait (SPEC: within 1 ms).
- **Churn.** Sixteen workers replaced after every request (``max_requests = 1``),
  every callback 0.1 s: how long a callback waited for its turn (from its hook's
  start), and how many callbacks a later arrival overtook (first come, first
  served: none).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from gunicorn_lifecycle.layout import H

from .load import request
from .report import Budget, Row, Table, median
from .server import Gunicorn, children, cpu_exact, plugin_hooks, state_words, wait_for

WORKERS = 8
EXIT_BUDGET = 1e-3
CHURN_WORKERS, CHURN_SECONDS, CHURN_CALLBACK = 16, 20.0, 0.1
WAITERS = 4

RECORDER = '''\
import json as _json, os as _os, time as _time

_RECORD = {record!r}


def _write(**fields):
    fd = _os.open(_RECORD, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o600)
    _os.write(fd, (_json.dumps(fields) + "\\n").encode())
    _os.close(fd)


def _callback(name, sleep):
    def callback(event):
        began = _time.monotonic()
        if sleep:
            _time.sleep(sleep)
        _write(kind="callback", cb=name, pid=event.pid, began=began, ended=_time.monotonic())
    return callback


def _hook(name, hook):
    def timed(*args):
        began = _time.monotonic()
        try:
            return hook(*args)
        finally:
            if name != "worker_exit" or args[1].pid == _os.getpid():
                _write(kind="hook", cb=name, pid=_os.getpid(), began=began,
                       ended=_time.monotonic())
    if name == "worker_start":  # Gunicorn checks each hook's arity
        return lambda worker: timed(worker)
    return lambda server, worker: timed(server, worker)
'''


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    plugin, bare, gaps, worst = [], [], [], []
    for repeat in range(repeats):
        own = _exits(workdir / f"{repeat}-exits", sleep=0.0)
        plugin.append(median(own))
        worst.append(max(own))
        bare.append(median(_exits(workdir / f"{repeat}-bare", sleep=0.0, bare=True)))
        gaps += _handover_gaps(workdir / f"{repeat}-handover")
    waits, overtaken = _churn(workdir / "churn", 5.0 if quick else CHURN_SECONDS)
    waiting, idle = _waiting_cpu(workdir / "waiting", 2.0 if quick else 5.0)
    return Table(
        f"7. the turn: {WORKERS} worker_exits with callbacks at once; churn",
        [Row("worker_exit plugin time, median per worker (worst round)", max(plugin),
             median(bare), "s", Budget("value", EXIT_BUDGET)),
         Row("worker_exit plugin time, median per worker (median round)", median(plugin),
             median(bare), "s"),
         Row("worker_exit plugin time, slowest worker (median round)", median(worst),
             median(bare), "s"),
         Row("handover: idle gap between callbacks, median", median(gaps), None, "s"),
         Row("handover: idle gap between callbacks, max", max(gaps), None, "s",
             Budget("value", EXIT_BUDGET)),
         Row("churn: wait for the turn, median", median(waits), None, "s"),
         Row("churn: wait for the turn, longest", max(waits), None, "s"),
         Row("churn: callbacks run before one that asked earlier", overtaken, None, "x",
             Budget("value", 0)),
         Row("a waiter's CPU, share of one core (vs an idle worker's)", waiting, idle, "x")],
        [f"{repeats} rounds; plugin time: the worker_exit hook less its own callback, which "
         "records itself; baseline: bare Gunicorn running the same callback under a blocking "
         "flock, the same timer around it",
         f"handover: {WORKERS} exits with 20 ms callbacks, {repeats} rounds pooled",
         f"waiter: {WAITERS} workers waiting for their worker_start turn behind a callback "
         "that sleeps, their CPU over the window, against the idle workers of a bare "
         "Gunicorn over the same window",
         f"churn: {CHURN_WORKERS} workers, max_requests = 1, every callback "
         f"{CHURN_CALLBACK:g} s, 8 clients; a wait runs from the hook's start to the "
         "callback's; run before one that asked more than 0.05 s earlier: overtook it"],
    )


# The leanest turn there is: the kernel's own queue on a blocking flock around the callback.
FLOOR = '''\
import fcntl as _fcntl

_turn_callback = _callback("worker_exit", 0.0)


def _lean(server, worker):
    if worker.pid != _os.getpid():
        return
    fd = _os.open({lock!r}, _os.O_RDWR | _os.O_CREAT, 0o600)
    _fcntl.flock(fd, _fcntl.LOCK_EX)
    try:
        _turn_callback(type("Event", (), {{"pid": _os.getpid()}}))
    finally:
        _fcntl.flock(fd, _fcntl.LOCK_UN)
        _os.close(fd)


worker_exit = _hook("worker_exit", _lean)
'''


def _config(directory: Path, sleep: float, bare: bool = False, callbacks: tuple[str, ...] = (
        "worker_exit",)) -> tuple[str, Path]:
    record = directory.parent / f"{directory.name}.jsonl"
    hooks = RECORDER.format(record=str(record))
    if bare:
        return hooks + FLOOR.format(lock=str(directory.parent / f"{directory.name}.lock")), record
    hooks += plugin_hooks(directory / "lifecycle.state",
                          {name: f"_callback({name!r}, {sleep!r})" for name in callbacks})
    hooks += "worker_exit = _hook('worker_exit', worker_exit)\n"
    hooks += "post_worker_init = _hook('worker_start', post_worker_init)\n"
    return hooks, record


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _exits(directory: Path, sleep: float, bare: bool = False) -> list[float]:
    """Eight workers stopped together: each one's worker_exit hook less its callback."""
    hooks, record = _config(directory, sleep, bare)
    with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
        server.ready()
        server.stop()
    found = _records(record)
    hooks_took = {r["pid"]: float(r["ended"]) - float(r["began"])  # type: ignore[arg-type]
                  for r in found if r["kind"] == "hook" and r["cb"] == "worker_exit"}
    callbacks_took = {r["pid"]: float(r["ended"]) - float(r["began"])  # type: ignore[arg-type]
                      for r in found if r["kind"] == "callback"}
    if len(hooks_took) != WORKERS or set(callbacks_took) != set(hooks_took):
        raise RuntimeError(f"{len(hooks_took)} worker_exit hooks and {len(callbacks_took)} "
                           f"callbacks recorded, not {WORKERS} each: {server.log_tail()}")
    return [took - callbacks_took.get(pid, 0.0) for pid, took in hooks_took.items()]


def _handover_gaps(directory: Path) -> list[float]:
    """Eight workers stopped together, each callback 20 ms: the gaps between callbacks."""
    hooks, record = _config(directory, 0.02)
    with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
        server.ready()
        server.stop()
    runs = sorted((float(r["began"]), float(r["ended"]))  # type: ignore[arg-type]
                  for r in _records(record) if r["kind"] == "callback")
    if len(runs) != WORKERS:
        raise RuntimeError(f"{len(runs)} worker_exit callbacks, not {WORKERS}")
    return [max(0.0, began - runs[n][1]) for n, (began, _) in enumerate(runs[1:])]


def _churn(directory: Path, seconds: float) -> tuple[list[float], int]:
    """Churn for ``seconds``: each callback's wait for its turn, and the overtakes seen."""
    hooks, record = _config(directory, CHURN_CALLBACK,
                            callbacks=("worker_start", "worker_exit"))
    with Gunicorn(directory, workers=CHURN_WORKERS, hooks=hooks,
                  settings="max_requests = 1\n") as server:
        server.ready(timeout=120)
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                request(str(server.socket))

        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(seconds)  # the window of churn measured, not a wait for a condition
        stop.set()
        for thread in clients:
            thread.join()
        server.stop(timeout=120)
    found = _records(record)
    asked = {(r["cb"], r["pid"]): float(r["began"])  # type: ignore[arg-type]
             for r in found if r["kind"] == "hook"}
    runs = sorted((float(r["began"]), asked[r["cb"], r["pid"]])  # type: ignore[arg-type]
                  for r in found if r["kind"] == "callback" and (r["cb"], r["pid"]) in asked)
    waits = [began - ask for began, ask in runs]
    overtaken = sum(any(later_ask < ask - 0.05 for _, later_ask in runs[n + 1 :])
                    for n, (_, ask) in enumerate(runs))
    if len(runs) < CHURN_WORKERS:
        raise RuntimeError(f"only {len(runs)} callbacks under churn: {server.log_tail()}")
    return waits, overtaken


def _waiting_cpu(directory: Path, seconds: float) -> tuple[float, float]:
    """The CPU share of a worker waiting for its turn, and of an idle bare worker."""
    record = directory.parent / "waiting.jsonl"
    hooks = RECORDER.format(record=str(record)) + plugin_hooks(
        directory / "lifecycle.state",
        {"worker_start": "_callback('worker_start', 0.0)",
         "master_ready": f"lambda event: (_write(kind='holding'), _time.sleep({seconds + 30!r}))"})
    with Gunicorn(directory, workers=1, hooks=hooks) as server:
        wait_for(lambda: record.exists() and "holding" in record.read_text(),
                 "the first worker's master_ready callback holding the turn")
        words = state_words(directory / "lifecycle.state")
        holder = children(server.pid)
        for waiters in range(1, WAITERS + 1):  # one at a time: signals do not queue
            server.signal(signal.SIGTTIN)
            wait_for(lambda: words[H.NEXT_TICKET] - words[H.SERVING] > waiters,  # noqa: B023
                     f"{waiters} workers waiting for their turn")
        share = _cpu_share([pid for pid in children(server.pid) if pid not in holder], seconds)
    with Gunicorn(directory.parent / "idle", workers=WAITERS) as bare:
        bare.ready()
        idle = _cpu_share(children(bare.pid), seconds)
    return share, idle


def _cpu_share(pids: list[int], seconds: float) -> float:
    """The median share of one core each of ``pids`` used over ``seconds``."""
    before = {pid: cpu_exact(pid) for pid in pids}
    time.sleep(seconds)  # the measured window, not a wait for a condition
    return median((cpu_exact(pid) - before[pid]) / seconds for pid in pids)
