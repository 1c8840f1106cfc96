"""README's recipes, run as written on real Gunicorn."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

from gunicorn_lifecycle.statefile import default_path
from harness import REPO, Server, wait_for

Make = Callable[..., Server]


def recipe(name: str) -> str:
    """The README code block that starts with ``# recipe: <name>``."""
    readme = (REPO / "README.md").read_text()
    found = re.search(rf"```python\n(# recipe: {re.escape(name)}\n.*?)```", readme, re.S)
    assert found, f"README has no recipe {name!r}"
    return found.group(1)


def recipe_server(server: Make, name: str, workers: int, settings: str = "") -> Server:
    """A server configured by a recipe, which keeps the default state file."""
    s = server(workers=workers, settings=recipe(name) + settings, record=False)
    s.state_file = default_path([f"unix:{s.sock}"])
    return s


def test_prometheus_directory_wiped_only_on_cold_start(server: Make, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "counter_99999.db").write_bytes(b"left by a server that crashed")
    s = recipe_server(server, "prometheus", 2)
    s.app = "example_app.metrics:app"
    s.start(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics)})
    wait_for(lambda: len(s.live_workers(s.pid)) == 2, "two workers")
    assert not (metrics / "counter_99999.db").exists(), "wiped at the cold start"

    def files(prefix: str) -> set[str]:
        return {p.name for p in metrics.iterdir() if p.name.startswith(prefix)}

    for _ in range(10):
        s.request()
    old_workers = s.live_workers(s.pid)
    wait_for(lambda: len(files("gauge_livesum")) == 2, "a live gauge per worker")
    counters = files("counter_")
    s.signal(signal.SIGHUP)
    wait_for(lambda: not set(old_workers) & set(s.live_workers(s.pid)), "the old workers gone")
    assert counters <= files("counter_"), "a reload keeps what live workers wrote"
    for pid in old_workers:  # mark_process_dead from worker_exit
        assert f"gauge_livesum_{pid}.db" not in files("gauge_livesum")

    for _ in range(10):
        s.request()
    victim = s.live_workers(s.pid)[0]
    wait_for(lambda: f"gauge_livesum_{victim}.db" in files("gauge_livesum"), "the victim's gauge")
    os.kill(victim, signal.SIGKILL)  # mark_process_dead from worker_lost
    wait_for(lambda: f"gauge_livesum_{victim}.db" not in files("gauge_livesum"),
             "the lost worker's live gauge removed")
    s.stop()


def test_run_once_per_deploy(server: Make, tmp_path: Path) -> None:
    deploys = tmp_path / "deploys.log"
    pidfile = tmp_path / "gunicorn.pid"
    s = recipe_server(server, "run-once", 3, f"pidfile = {str(pidfile)!r}\n")
    s.start(env={"DEPLOY_LOG": str(deploys)})
    wait_for(lambda: len(s.live_workers(s.pid)) == 3, "three workers")
    s.signal(signal.SIGHUP)  # config only: no migration
    s.signal(signal.SIGUSR2)
    wait_for(lambda: deploys.exists() and len(deploys.read_text().splitlines()) == 2,
             "the upgrade's migration")
    lines = deploys.read_text().splitlines()
    assert lines[0].endswith("(start)") and lines[1].endswith("(upgrade)"), lines
    new_master = int(wait_for(lambda: _read(Path(f"{pidfile}.2")), "the new master's pidfile"))
    s.signal(signal.SIGTERM, new_master)
    s.wait_exit(new_master)
    s.stop()
    assert len(deploys.read_text().splitlines()) == 2, "nothing more for a rollback or a stop"


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def test_first_and_last_worker(server: Make, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    s = recipe_server(server, "first-last", 3)
    s.start(env={"MARKS": str(marks)})
    s.wait_booted(workers=3)
    s.signal(signal.SIGHUP)
    wait_for(lambda: marks.read_text().count("first ") == 2, "the reload's first worker")
    s.wait_booted(workers=3)  # stopped halfway, a worker Gunicorn had not yet set up is killed
    s.stop()
    lines = marks.read_text().splitlines()
    assert [line.split()[0] for line in lines].count("first") == 2, lines
    assert [line.split()[0] for line in lines].count("last") == 2, lines
    generations = {line.split()[1].split("-")[0] for line in lines}
    assert len(generations) == 2, "one first and one last per generation"


def test_recipes_combined_with_lists(server: Make, tmp_path: Path) -> None:
    metrics, deploys = tmp_path / "metrics", tmp_path / "deploys.log"
    metrics.mkdir()
    (metrics / "counter_99999.db").write_bytes(b"left by a server that crashed")
    s = recipe_server(server, "combined", 2)
    s.app = "example_app.metrics:app"
    s.start(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics), "DEPLOY_LOG": str(deploys)})
    wait_for(lambda: len(s.live_workers(s.pid)) == 2, "two workers")
    assert not (metrics / "counter_99999.db").exists(), "the first master_start callback ran"
    assert deploys.read_text().splitlines() == [
        "migrated for generation 1 (start)"], "and so did the second"
    for _ in range(10):
        s.request()
    victim = s.live_workers(s.pid)[0]
    wait_for(lambda: (metrics / f"gauge_livesum_{victim}.db").exists(), "the victim's gauge")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not (metrics / f"gauge_livesum_{victim}.db").exists(),
             "mark_process_dead from worker_lost")
    s.stop()


def test_one_worker_runs_the_scheduler_fenced_by_term(server: Make, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    s = recipe_server(server, "leader", 3, "timeout = 300\n")
    s.start(env={"LEDGER": str(ledger)})

    def rows() -> list[tuple[int, int]]:
        text = ledger.read_text() if ledger.exists() else ""
        return [(int(row.split()[0]), int(row.split()[-1])) for row in text.splitlines()]

    def terms() -> list[int]:
        return sorted({t for t, _ in rows()})

    def writers(nth: int) -> set[int]:
        """The workers that wrote in the ``nth`` term seen (from 0)."""
        found = terms()
        return {pid for t, pid in rows() if t == found[nth]} if len(found) > nth else set()

    wait_for(lambda: writers(0), "the first leader's ticks")
    (first,) = writers(0)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: writers(1), "a new leader's ticks after kill -9", timeout=10)
    (second,) = writers(1)
    os.kill(second, signal.SIGSTOP)  # frozen past the bound: replaced; its job is fenced off
    try:
        wait_for(lambda: writers(2), "a third leader's ticks", timeout=15)
    finally:
        os.kill(second, signal.SIGCONT)
    third = terms()[2]
    wait_for(lambda: [t for t, _ in rows()].count(third) >= 3, "the third leader ticking on")
    assert terms()[1:] == [terms()[0] + 1, terms()[0] + 2], "a term per election"
    assert {pid for _, pid in rows()} == {first, second, *writers(2)}
    assert [t for t, _ in rows()] == sorted(t for t, _ in rows()), "a stale term wrote after"
    s.stop()
