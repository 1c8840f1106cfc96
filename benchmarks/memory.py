"""Benchmark 5: the resident memory each worker gains from the plugin.

VmRSS of every worker of bare Gunicorn and of Gunicorn with the plugin (same
app, same worker count), read once every plugin worker has beaten and a sweep
has run, so that the whole heartbeat path has been touched. Two more figures
show where the gain comes from: Gunicorn whose config only imports filelock (the
lock's dependency), and the workers' private memory (USS, from smaps_rollup),
which unlike VmRSS leaves out the pages shared with the master. Also the state
file's size per slot, fixed by the layout.
"""

from __future__ import annotations

from pathlib import Path

from gunicorn_lifecycle.layout import SLOT_WORDS, WORD, file_size

from .report import Budget, Row, Table, median
from .server import (
    Gunicorn,
    plugin_hooks,
    registered_slots,
    rss_bytes,
    state_words,
    uss_bytes,
    wait_beats,
)

WORKERS = 4
INTERVAL = 0.1
FAILED = 60.0
DEFAULT_SLOTS = 256


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    rss: dict[str, list[float]] = {"bare": [], "filelock": [], "plugin": []}
    uss: dict[str, list[float]] = {"bare": [], "filelock": [], "plugin": []}
    for repeat in range(repeats):
        for kind in rss:
            resident, private = _worker_memory(workdir / f"{repeat}-{kind}", kind)
            rss[kind].append(resident)
            uss[kind].append(private)
    return Table(
        "5. memory",
        [
            Row("worker VmRSS, plugin vs bare", median(rss["plugin"]), median(rss["bare"]), "B",
                Budget("gain", 2.0**20)),
            Row("worker VmRSS, `import filelock` only vs bare", median(rss["filelock"]),
                median(rss["bare"]), "B"),
            Row("worker private memory (USS), plugin vs bare", median(uss["plugin"]),
                median(uss["bare"]), "B"),
            Row("state file per slot", SLOT_WORDS * WORD, None, "B"),
        ],
        [f"{WORKERS} sync workers; median over workers, median of {repeats} runs; the state "
         f"file is {file_size(DEFAULT_SLOTS):,} bytes at the default {DEFAULT_SLOTS} slots"],
    )


def _worker_memory(directory: Path, kind: str) -> tuple[float, float]:
    """The median VmRSS and USS of one instance's workers, once booted (and beaten)."""
    state_file = directory / "lifecycle.state"
    hooks = {"bare": "", "filelock": "import filelock\n",
             "plugin": plugin_hooks(state_file, interval=INTERVAL, failed=FAILED)}[kind]
    with Gunicorn(directory, workers=WORKERS, hooks=hooks) as server:
        pids = server.ready()
        if kind == "plugin":
            words = state_words(state_file)
            wait_beats(words, registered_slots(words))
        return median(rss_bytes(pid) for pid in pids), median(uss_bytes(pid) for pid in pids)
