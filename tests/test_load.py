"""A slow callback stalls no one's bookkeeping (SPEC section 6; issue 12 point 5).

A run-once user's ``master_start`` sleeps 10 s in the new master of a ``USR2``,
while the old master's workers churn (``max_requests``) under load: the old
master must go on reaping and respawning, its workers serving. Compared, in the
same run, with bare Gunicorn whose new master sleeps 10 s in its own
``on_starting``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from harness import Load, Server, wait_for

Make = Callable[..., Server]
WORKERS = 4
CHURN = f"max_requests = 20\npidfile = 'gunicorn.pid'\nworkers = {WORKERS}\n"

SLOW_NEW_MASTER = """
import json, os, time

def slow(event):  # a run-once user doing its work in the callback, as the README once said
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps({"cb": event.reason, "t": time.monotonic()}) + "\\n").encode())
    os.close(fd)
    if event.reason == "upgrade":
        time.sleep(10)
        os.close(os.open("slow-done", os.O_CREAT | os.O_WRONLY))

gunicorn_lifecycle.configure(master_start=slow, master_exit=slow, state_file="lifecycle.state")
"""

BARE_SLOW_NEW_MASTER = """
import os, time

def on_starting(server):
    if os.environ.get("GUNICORN_PID"):  # the new master of a USR2
        time.sleep(10)
        os.close(os.open("slow-done", os.O_CREAT | os.O_WRONLY))
"""


def upgrade_under_load(s: Server) -> Load:
    """USR2 while clients send requests; returns once the new master serves and the old
    master stopped."""
    s.start()
    wait_for(lambda: len(s.live_workers(s.pid)) == WORKERS, "the workers")
    load = Load(s)
    wait_for(lambda: len(load.latencies) > 200, "requests before the upgrade")
    s.signal(signal.SIGUSR2)
    wait_for(lambda: (s.directory / "slow-done").exists(), "the new master's slow start", 30)
    new_master = int(wait_for(lambda: _read(s.directory / "gunicorn.pid.2"), "its pidfile"))
    wait_for(lambda: len(s.live_workers(new_master)) == WORKERS, "the new master's workers")
    served = len(load.latencies)
    wait_for(lambda: len(load.latencies) > served + 200, "requests after the upgrade")
    s.signal(signal.SIGTERM)  # the old master retires
    s.wait_exit()
    load.stop()
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    return load


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def test_a_slow_master_start_in_the_new_master_stalls_no_request(server: Make) -> None:
    bare = upgrade_under_load(server(record=False, hooks=(), settings=CHURN
                                     + BARE_SLOW_NEW_MASTER))
    assert not bare.failures, bare.failures[:3]
    s = server(record=False, settings=CHURN + SLOW_NEW_MASTER)
    plugin = upgrade_under_load(s)
    assert not plugin.failures, plugin.failures[:3]
    slowest, bare_slowest = max(plugin.latencies), max(bare.latencies)
    assert slowest < bare_slowest + 2.0, (slowest, bare_slowest)
    assert "the master_start callback slow ran 10.0s" in s.log_text()
    assert [e["cb"] for e in s.events()] == ["start", "upgrade", "upgrade", "stop"]
    print(f"slowest request: {slowest:.3f} s with the plugin, {bare_slowest:.3f} s bare; "
          f"{len(plugin.latencies)} and {len(bare.latencies)} requests, none failed")


def test_readme_recipes_during_a_slow_migration(server: Make, tmp_path: Path) -> None:
    from test_recipes import recipe

    metrics, deploys = tmp_path / "metrics", tmp_path / "deploys.log"
    metrics.mkdir()
    slow_migration = ("\n_ready = when_ready\n\ndef when_ready(server):\n"
                      "    import os, time\n    if os.environ.get('GUNICORN_PID'):\n"
                      "        time.sleep(10)  # the migration of the new code\n"
                      "    _ready(server)\n"
                      "    os.close(os.open('slow-done', os.O_CREAT | os.O_WRONLY))\n")
    s = server(record=False, settings=CHURN + recipe("combined") + slow_migration)
    s.app = "example_app.metrics:app"
    s.env.update(PROMETHEUS_MULTIPROC_DIR=str(metrics), DEPLOY_LOG=str(deploys))
    load = upgrade_under_load(s)
    assert not load.failures, load.failures[:3]
    assert max(load.latencies) < 2.0, max(load.latencies)
    assert [line.split("(")[1] for line in deploys.read_text().splitlines()] == [
        "start)", "upgrade)"]
