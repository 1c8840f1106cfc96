"""Deploys an orchestrator can trust (SPEC sections 7 and 8): back-to-back upgrades, waiting
for a server just started, the three probes, a dead new master reported at once, a warm-up
gate, progress where nobody watches a terminal, status in lineage order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gunicorn_lifecycle.status import read_status
from harness import Load, Server, check_record, cli, one_line, wait_for

Make = Callable[..., Server]

# An application whose /healthz answers 500 while the file $BROKEN_HEALTH exists: a release
# that imports well and cannot serve (a view that fails at its first request).
HEALTH_APP = '''
import os

BROKEN = os.environ.get("BROKEN_HEALTH", "/nonexistent")


def _status(path):
    return "500 Internal Server Error" if path == "/healthz" and os.path.exists(BROKEN) else \\
        "200 OK"


def app(environ, start_response):
    start_response(_status(environ["PATH_INFO"]), [("Content-Type", "text/plain")])
    return [b"ok"]


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    status = int(_status(scope["path"]).split()[0])
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
'''


def health_server(server: Make, tmp_path: Path, asgi: bool = False, **options: Any
                  ) -> tuple[Server, Path]:
    """A server of HEALTH_APP with ``warmup="/healthz"``, and the file that breaks it."""
    (tmp_path / "health_app.py").write_text(HEALTH_APP)
    broken = tmp_path / "broken"
    settings = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
    if asgi:
        settings += "worker_class = 'uvicorn_worker.UvicornWorker'\n"
    s = server(warmup="/healthz", settings=settings + options.pop("settings", ""), **options)
    s.app = "health_app:asgi" if asgi else "health_app:app"
    s.env["BROKEN_HEALTH"] = str(broken)
    return s, broken


def test_two_upgrades_back_to_back(server: Make) -> None:
    s = server(workers=2, interval=0.2, failed=1.0).start(wait_workers=2)
    load = Load(s, clients=4)
    try:
        first = cli("upgrade", "--state", s.state_file, "--timeout", "60")
        second = cli("upgrade", "--state", s.state_file, "--timeout", "60")  # at once
    finally:
        load.stop()
    assert first.returncode == 0, first
    assert second.returncode == 0, second
    assert not load.failures, load.failures[:3]
    masters = [e["in_pid"] for e in s.events("master_start")]
    assert [e["reason"] for e in s.events("master_start")] == ["start", "upgrade", "upgrade"]
    newest = masters[-1]
    assert second.stdout.strip().startswith("upgraded: generation 3 ")
    s.signal(signal.SIGTERM, newest)
    s.wait_exit(newest)
    assert [e["reason"] for e in s.events("master_exit")] == ["upgrade", "upgrade", "stop"]
    check_record(s.events(), lineage=lambda g: g)


def test_wait_waits_for_a_server_just_started(server: Make, tmp_path: Path) -> None:
    s = server(workers=2)
    assert not os.path.exists(s.state_file)
    said = tmp_path / "wait.err"
    with open(said, "w") as err:
        waiting = subprocess.Popen([sys.executable, "-m", "gunicorn_lifecycle", "wait",
                                    "--state", s.state_file, "--timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=err, text=True)
    wait_for(lambda: "to be made" in said.read_text(), "wait waiting for the state file")
    s.start()  # as a script does: start the server, then wait for it
    out, _ = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, said.read_text()
    assert out.strip() == f"generation 1 (master {s.pid}) is ready"
    assert said.read_text().startswith(f"gunicorn-lifecycle: waiting for the state file "
                                       f"{s.state_file} to be made")
    s.stop()


def test_the_three_probes_through_an_upgrade(server: Make, tmp_path: Path) -> None:
    from gated import Gate

    gate = Gate(tmp_path)  # no sweep within the test: a dead master's generation stays open
    s = gate.start(gate.server(server, workers=2, interval=30.0, failed=5.0), wait_workers=2)
    state = ("--state", s.state_file)
    assert cli("check", "--alive", *state).returncode == 0, "booting is alive"
    assert cli("check", *state).returncode == 1 and cli("check", "--newest", *state).returncode
    gate.let(2)
    s.wait_count("master_ready", 1)
    assert cli("check", *state).returncode == 0
    s.signal(signal.SIGUSR2)  # the new master's workers wait for tokens: a long boot
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.wait_registered(4)
    ready = cli("check", *state)
    assert ready.returncode == 0, ready  # the old generation serves throughout
    assert ready.stdout.startswith("ok: generation 1 ") and "generation 2 is not ready" in (
        ready.stdout), ready.stdout
    newest = cli("check", "--newest", *state)
    assert newest.returncode == 1 and one_line(newest).startswith(
        "generation 2 is not ready"), newest
    alive = cli("check", "--alive", *state)
    assert alive.returncode == 0 and "generation 2" in alive.stdout, alive
    for pid in [upgrade["in_pid"], *s.live_workers(upgrade["in_pid"])]:
        os.kill(pid, signal.SIGKILL)  # the newest master dies, and its booting workers
    dead = cli("check", "--alive", *state)
    assert dead.returncode == 1 and "is not running" in one_line(dead), dead
    assert cli("check", *state).returncode == 0, "the old one still serves"
    s.signal(signal.SIGTERM)  # its killed workers never boot: no wait for them
    s.wait_exit()


def test_an_upgrade_whose_new_master_is_killed_is_rolled_back_within_a_second(
    server: Make, tmp_path: Path
) -> None:
    from gated import Gate

    gate = Gate(tmp_path)  # a heartbeat interval of 30 s: no sweep will come to the rescue
    s = gate.start(gate.server(server, workers=2, interval=30.0, failed=5.0), wait_workers=2)
    gate.let(2)
    s.wait_count("master_ready", 1)
    load = Load(s, clients=4)
    upgrading = subprocess.Popen([sys.executable, "-m", "gunicorn_lifecycle", "upgrade",
                                  "--state", s.state_file, "--timeout", "60"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        new = s.wait_count("master_start", 1, reason="upgrade")[0]["in_pid"]
        s.wait_registered(4)  # its two workers too, booting
        booting = s.live_workers(new)
        killed = time.monotonic()
        os.kill(new, signal.SIGKILL)  # while its workers boot
        _, err = upgrading.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        load.stop()
    assert upgrading.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"gunicorn-lifecycle: rolled back: master "
                                                   f"{new} exited"), err
    assert took < 2.0, f"reported {took:.1f}s after the new master died"
    assert not load.failures, load.failures[:3]
    for pid in booting:
        os.kill(pid, signal.SIGKILL)  # orphans that would wait for their tokens for ever
    s.signal(signal.SIGTERM)  # (their slots stay registered until a sweep: no wait for boots)
    s.wait_exit()


@pytest.mark.parametrize("asgi", [False, True], ids=["wsgi", "asgi"])
def test_an_upgrade_to_a_release_that_cannot_serve_is_rolled_back(server: Make,
                                                                  tmp_path: Path,
                                                                  asgi: bool) -> None:
    s, broken = health_server(server, tmp_path, asgi, workers=2, interval=0.2, failed=1.0)
    s.start(wait_workers=2)
    s.wait_count("master_ready", 1)
    broken.touch()  # the new release's /healthz answers 500
    load = Load(s, clients=4)
    try:
        done = cli("upgrade", "--state", s.state_file, "--timeout", "60")
    finally:
        load.stop()
    assert done.returncode == 1, done
    assert one_line(done).startswith("rolled back: master ") and "exited before its " \
        "generation was ready" in one_line(done), done
    assert not load.failures and load.latencies, "the old release served throughout"
    assert "failed its warm-up GET /healthz answered 500" in s.log_text()
    assert [e["reason"] for e in s.events("master_exit")] == ["rollback"]
    new_starts = [e for e in s.events("worker_start") if e["generation"] != 1]
    assert not new_starts, "a worker that failed its warm-up never started"
    s.stop()
    check_record(s.events())


def test_a_cold_start_that_cannot_serve_fails(server: Make, tmp_path: Path) -> None:
    s, broken = health_server(server, tmp_path, workers=1)
    broken.touch()
    s.start()
    s.wait_exit(timeout=30)
    assert s.proc is not None and s.proc.returncode != 0
    assert "failed its warm-up GET /healthz answered 500" in s.log_text()
    assert not s.events("worker_start") and not s.events("master_ready")


def test_a_warmup_callable_that_raises_fails_the_boot(server: Make, tmp_path: Path) -> None:
    settings = ("def _warm(worker):\n    raise RuntimeError('the cache did not load')\n"
                "gunicorn_lifecycle.configure(warmup=_warm, state_file=" )
    s = server(workers=1, record=False)
    s.conf.write_text(s.conf.read_text() + settings + f"{s.state_file!r})\n")
    s.start()
    s.wait_exit(timeout=30)
    assert s.proc is not None and s.proc.returncode != 0
    assert "failed its warm-up _warm raised RuntimeError: the cache did not load" in (
        s.log_text())


def test_progress_is_one_plain_line_per_step_when_not_on_a_terminal(server: Make) -> None:
    s = server(workers=1, interval=0.2, failed=1.0).start(wait_workers=1)
    done = cli("reload", "--state", s.state_file, "--timeout", "60")  # stderr is a pipe
    assert done.returncode == 0, done
    steps = done.stderr.strip().splitlines()
    assert steps[0] == f"gunicorn-lifecycle: HUP sent to master {s.pid}; waiting for its new " \
        "generation", steps
    assert all(line.startswith("gunicorn-lifecycle: ") and "\r" not in line for line in steps)
    quiet = cli("reload", "--state", s.state_file, "--timeout", "60", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet
    s.stop()


def test_status_lists_generations_by_lineage(server: Make) -> None:
    s = server(workers=1, interval=0.2, failed=1.0).start(wait_workers=1)
    s.signal(signal.SIGUSR2)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.signal(signal.SIGHUP)  # the old master's HUP: generation 3, older by lineage than 2
    reload = s.wait_count("master_start", 1, reason="reload")[0]
    assert reload["generation"] == 3 and upgrade["generation"] == 2
    listed = [g["generation"] for g in json.loads(cli("status", "--state", s.state_file,
                                                      "--json").stdout)["generations"]]
    assert listed.index(3) < listed.index(2), listed
    assert [g["generation"] for g in read_status(s.state_file)["generations"]][-1] == 2
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_exit(upgrade["in_pid"])
    s.stop()


def test_a_migration_that_fails_in_when_ready_rolls_the_upgrade_back(server: Make,
                                                                      tmp_path: Path) -> None:
    """README's run-once recipe lets a failed migration out of when_ready: the new master
    then dies before any worker forks, and upgrade rolls back, the old release serving."""
    failing = tmp_path / "migration-fails"
    settings = ("def when_ready(server):\n"
                f"    if os.path.exists({str(failing)!r}):\n"
                "        raise RuntimeError('the migration failed')\n")
    s = server(workers=2, interval=0.2, failed=1.0, settings=settings).start(wait_workers=2)
    s.wait_count("master_ready", 1)
    failing.touch()
    load = Load(s, clients=4)
    try:
        done = cli("upgrade", "--state", s.state_file, "--timeout", "60")
    finally:
        load.stop()
    assert done.returncode == 1 and one_line(done).startswith("rolled back: master "), done
    assert "the migration failed" in s.log_text()
    assert not load.failures, load.failures[:3]
    s.wait_count("master_exit", 1, reason="rollback")  # closed by a sweep: its master died
    s.stop()
    check_record(s.events())
