"""Benchmark 4: what a sweep costs at 1,024 slots, and that sweeps stay one per interval.

First, in this process: a state file of 1,024 (and of 256) registered slots, and
``Worker.beat``, the very code the heartbeat thread runs, timed once with a
sweep due and once without. Then a real Gunicorn with 16 workers beating every
50 ms: this process samples the header's sweep deadline and every slot's
heartbeat about once a millisecond, and counts sweeps and beats per interval.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from gunicorn_lifecycle.layout import H, SlotState
from gunicorn_lifecycle.master import Master
from gunicorn_lifecycle.options import Options
from gunicorn_lifecycle.protocol import Words
from gunicorn_lifecycle.statefile import open_for_server
from gunicorn_lifecycle.transaction import Transactions
from gunicorn_lifecycle.worker import Worker

from .report import Budget, Row, Table, median
from .server import Gunicorn, heartbeat, plugin_hooks, registered_slots, state_words

SLOTS, FEWER_SLOTS = 1024, 256
WORKERS = 16
INTERVAL = 0.05
FAILED = 60.0


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    workdir.mkdir(parents=True)
    samples, seconds = (50, 1.0) if quick else (300, 3.0)
    # (worker, its master): the master is kept, or its presence in the state file goes with it
    beaters = {slots: _registered_worker(workdir, slots) for slots in (SLOTS, FEWER_SLOTS)}
    sweeping: dict[int, list[float]] = {SLOTS: [], FEWER_SLOTS: []}
    plain: dict[int, list[float]] = {SLOTS: [], FEWER_SLOTS: []}
    sweeps: list[float] = []
    beats: list[float] = []
    gaps: list[float] = []
    for repeat in range(repeats):
        for slots, (worker, _) in beaters.items():
            sweeping[slots].append(median(_beat_time(worker, True) for _ in range(samples)))
            plain[slots].append(median(_beat_time(worker, False) for _ in range(samples)))
        per_interval = _sweeps_and_beats(workdir / f"{repeat}-gunicorn", seconds)
        sweeps.append(per_interval[0])
        beats.append(per_interval[1])
        gaps.append(per_interval[2])
    return Table(
        "4. sweeps",
        [
            Row(f"beat that sweeps {SLOTS} slots vs plain beat", median(sweeping[SLOTS]),
                median(plain[SLOTS]), "s"),
            Row(f"sweep of {SLOTS} vs {FEWER_SLOTS} slots", median(sweeping[SLOTS]),
                median(sweeping[FEWER_SLOTS]), "s"),
            Row(f"sweeps vs beats per interval, {WORKERS} workers", median(sweeps),
                median(beats), "x", Budget("value", 1.0)),
            Row("shortest gap between sweeps vs interval", min(gaps), INTERVAL, "s",
                Budget("ratio", 1.0, at_least=True)),
        ],
        [f"Worker.beat timed in this process, median of {samples} calls, median of {repeats} "
         "runs; every slot registered and fresh, so a sweep loses nobody",
         f"Gunicorn: {WORKERS} workers, interval {INTERVAL * 1e3:g} ms, sampled every ~1 ms "
         f"for {seconds:g} s, median of {repeats} runs; a sweep on every beat (the naive "
         f"design) would make {WORKERS} per interval"],
    )


def _registered_worker(workdir: Path, slots: int) -> tuple[Worker, Master]:
    """A state file with every slot registered, a Worker that owns the first slot, and the
    master of its generation."""
    path = str(workdir / f"in-process-{slots}.state")
    options = Options(state_file=path, slots=slots, interval=10.0, failed=FAILED)
    transactions = Transactions(open_for_server(path, slots), logging.getLogger(__name__))
    # Gunicorn's arbiter, as far as the master reads it: the worker count (the ready target).
    master = Master(transactions, server=SimpleNamespace(num_workers=1), parent_pid=0)
    master.start(options)
    # A description of its own, as a forked worker reopens one: the master's presence lock,
    # seen through the master's own description, would not show.
    own = Transactions(open_for_server(path, slots), logging.getLogger(__name__))
    worker = Worker(own, master.current, options, server=None, worker=None)
    worker.start()
    with own.bookkeeping("register", options.lock_timeout) as state:
        for index in range(1, slots):
            state.register(index, state.take_token(), master.current, worker.pid,
                           worker.started, time.monotonic_ns(), 0)
    if len(state.slots_in(SlotState.REGISTERED)) != slots:
        raise RuntimeError(f"could not register {slots} slots in {path}")
    return worker, master


def _beat_time(worker: Worker, sweep: bool) -> float:
    """Seconds one ``Worker.beat`` takes, with a sweep due or not."""
    words = worker.tx.state.words
    due = 0 if sweep else time.monotonic_ns() + 10**12
    words[H.NEXT_SWEEP] = due
    worker._last = time.monotonic_ns()  # a beat on time: it may sweep
    started = time.perf_counter_ns()
    worker.beat()
    elapsed = time.perf_counter_ns() - started
    if (words[H.NEXT_SWEEP] != due) != sweep:
        raise RuntimeError(f"the beat {'did not sweep' if sweep else 'swept'}")
    return elapsed / 1e9


def _sweeps_and_beats(directory: Path, seconds: float) -> tuple[float, float, float]:
    """Sweeps and beats per interval of a 16-worker Gunicorn, and the shortest sweep gap."""
    state_file = directory / "lifecycle.state"
    hooks = plugin_hooks(state_file, interval=INTERVAL, failed=FAILED)
    with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
        server.ready()
        words = state_words(state_file)
        indexes = registered_slots(words)
        if len(indexes) != WORKERS:
            raise RuntimeError(f"{len(indexes)} registered slots, not {WORKERS}")
        sweeps, beats, elapsed = _sample(words, indexes, seconds)
    if len(sweeps) < 2:
        raise RuntimeError(f"saw {len(sweeps)} sweeps in {elapsed:.1f} s")
    intervals = elapsed / INTERVAL
    gap = min(later - earlier for earlier, later in itertools.pairwise(sweeps)) / 1e9
    return (len(sweeps) - 1) / intervals, beats / intervals, gap


def _sample(words: Words, indexes: list[int],
            seconds: float) -> tuple[list[int], int, float]:
    """Every distinct sweep deadline seen, how many beats were seen, and for how long."""
    sweeps = [words[H.NEXT_SWEEP]]
    stamps = [heartbeat(words, index) for index in indexes]
    beats = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if (last := words[H.NEXT_SWEEP]) != sweeps[-1]:
            sweeps.append(last)
        for n, index in enumerate(indexes):
            if (stamp := heartbeat(words, index)) != stamps[n]:
                stamps[n] = stamp
                beats += 1
        time.sleep(0.001)  # the sampling period, not a wait for anything
    return sweeps, beats, time.monotonic() - started
