"""Benchmark 5: the private memory each worker gains from the plugin.

Users pay a worker's private memory (USS: pages no other process maps), not the
pages it shares with the master that imported the plugin before forking. USS of
every worker of bare Gunicorn and of Gunicorn with the plugin (same app, same
worker count), read once every plugin worker has beaten and a sweep has run, so
that the whole heartbeat path has been touched; on the example app and on a
small Flask app. PSS (shared pages divided among their sharers) and VmRSS are
shown beside it, and filelock's share: Gunicorn whose config only imports it.
"""

from __future__ import annotations

from pathlib import Path

from gunicorn_lifecycle.layout import SLOT_WORDS, WORD, file_size

from .report import Budget, Row, Table, median
from .server import (
    APP,
    Gunicorn,
    plugin_hooks,
    pss_bytes,
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
APPS = {"example app": APP, "Flask app": "benchmarks.flask_app:app"}
KINDS = ("bare", "filelock", "plugin")
MEASURES = {"USS": uss_bytes, "PSS": pss_bytes, "VmRSS": rss_bytes}


def run(workdir: Path, repeats: int, quick: bool) -> Table:
    found: dict[tuple[str, str, str], list[float]] = {}
    for repeat in range(repeats):
        for app_name, app in APPS.items():
            for kind in KINDS:
                directory = workdir / f"{repeat}-{app_name.split()[0]}-{kind}"
                for measure, value in _worker_memory(directory, kind, app).items():
                    found.setdefault((app_name, kind, measure), []).append(value)

    def figure(app_name: str, kind: str, measure: str) -> float:
        return median(found[app_name, kind, measure])

    rows = []
    for app_name in APPS:
        rows += [
            Row(f"{app_name}: worker USS, plugin vs bare", figure(app_name, "plugin", "USS"),
                figure(app_name, "bare", "USS"), "B", Budget("gain", 2.0**20)),
            Row(f"{app_name}: worker PSS, plugin vs bare", figure(app_name, "plugin", "PSS"),
                figure(app_name, "bare", "PSS"), "B"),
            Row(f"{app_name}: worker VmRSS, plugin vs bare", figure(app_name, "plugin", "VmRSS"),
                figure(app_name, "bare", "VmRSS"), "B"),
            Row(f"{app_name}: worker USS, `import filelock` only vs bare",
                figure(app_name, "filelock", "USS"), figure(app_name, "bare", "USS"), "B"),
        ]
    rows.append(Row("state file per slot", SLOT_WORDS * WORD, None, "B"))
    return Table("5. memory", rows, [
        f"{WORKERS} sync workers; median over workers, median of {repeats} runs; the state "
        f"file is {file_size(DEFAULT_SLOTS):,} bytes at the default {DEFAULT_SLOTS} slots"])


def _worker_memory(directory: Path, kind: str, app: str) -> dict[str, float]:
    """The median USS, PSS and VmRSS of one instance's workers, once booted (and beaten)."""
    state_file = directory / "lifecycle.state"
    hooks = {"bare": "", "filelock": "import filelock\n",
             "plugin": plugin_hooks(state_file, interval=INTERVAL, failed=FAILED)}[kind]
    with Gunicorn(directory, workers=WORKERS, hooks=hooks, app=app) as server:
        pids = server.ready()
        if kind == "plugin":
            words = state_words(state_file)
            wait_beats(words, registered_slots(words))
        return {measure: median(read(pid) for pid in pids) for measure, read in MEASURES.items()}
