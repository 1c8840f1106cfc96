"""The deploy commands on real servers: ``upgrade``, ``reload``, ``wait``, ``check``
(SPEC section 7), finding the instance, and ``status --prometheus``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from gated import Gate
from prometheus_client.parser import text_string_to_metric_families

from gunicorn_lifecycle import deploy, layout
from gunicorn_lifecycle.cli import main
from gunicorn_lifecycle.deploy import Failed, health
from gunicorn_lifecycle.prometheus import render
from gunicorn_lifecycle.statefile import default_path
from gunicorn_lifecycle.status import read_status
from harness import Load, Server, alive, check_record, cli, one_line, wait_for

Make = Callable[..., Server]


def test_check_is_ok_when_ready_and_fails_with_a_reason_when_the_master_is_killed(
    server: Make
) -> None:
    s = server(workers=2, interval=0.2, failed=0.5).start(wait_workers=2)
    state = ("--state", s.state_file)
    done = cli("wait", *state, "--timeout", "30")
    assert done.returncode == 0 and "is ready" in done.stdout, done
    done = cli("check", *state)
    assert done.returncode == 0 and done.stdout.startswith("ok: generation 1"), done
    assert json.loads(cli("check", *state, "--json").stdout)["ok"] is True
    s.signal(signal.SIGKILL)
    s.wait_exit()
    done = cli("check", *state)
    assert done.returncode == 1, done
    assert "is not running" in one_line(done) or "no generation is open" in one_line(done)


def test_wait_and_check_follow_the_boots(server: Make, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2), wait_workers=2)
    state = ("--state", s.state_file)
    done = cli("check", *state)
    assert done.returncode == 1
    assert one_line(done) == "generation 1 is not ready (0 of 2 workers booted)"
    assert json.loads(cli("check", *state, "--json").stdout) == {
        "command": "check", "ok": False, "state_file": s.state_file,
        "message": "generation 1 is not ready (0 of 2 workers booted)"}
    done = cli("wait", *state, "--timeout", "0.5")
    assert done.returncode == 1 and one_line(done) == (
        f"waited 0.5s: generation 1 (master {s.pid}) is open and not ready (0 of 2 workers "
        "booted)")
    waiting = subprocess.Popen([sys.executable, "-m", "gunicorn_lifecycle", "wait", *state],
                               stdout=subprocess.PIPE, text=True)
    gate.let(2)
    out, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and out.strip() == f"generation 1 (master {s.pid}) is ready"
    assert cli("check", *state).returncode == 0
    s.signal(signal.SIGTERM)
    done = cli("wait", *state, "--closed", "--timeout", "30")
    assert done.returncode == 0 and done.stdout.strip() == "no generation is open", done


def test_upgrade_under_load_leaves_only_the_new_master(server: Make) -> None:
    s = server(workers=2, interval=0.5, failed=1.0).start(wait_workers=2)
    load = Load(s, clients=4)
    try:
        done = cli("upgrade", "--state", s.state_file, "--timeout", "60")
    finally:
        load.stop()
    assert done.returncode == 0 and done.stdout.startswith("upgraded: generation 2"), done
    assert not load.failures and len(load.latencies) > 100, (load.failures[:3],
                                                            len(load.latencies))
    s.wait_exit()  # the old master is gone, its generations closed as "upgrade"
    assert [e["reason"] for e in s.events("master_exit")] == ["upgrade"]
    (gen,) = read_status(s.state_file)["generations"]
    new = gen["master_pid"]
    assert gen["open"] and gen["ready"] and gen["reason"] == "upgrade" and alive(new)
    assert f"master {new}" in done.stdout and new != s.pid
    s.signal(signal.SIGTERM, new)
    s.wait_count("master_exit", 2)
    check_record(s.events())


def test_upgrade_to_code_that_fails_to_import_rolls_back(server: Make, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.2, failed=0.5), wait_workers=2)
    gate.let(2)
    s.wait_booted(workers=2)  # the old workers imported the good code before it breaks
    gate.broken.touch()  # the new code fails to import
    load = Load(s, clients=4)
    try:
        done = cli("upgrade", "--state", s.state_file, "--timeout", "60")
    finally:
        load.stop()
    assert done.returncode == 1, done
    assert one_line(done).startswith("rolled back: master "), done
    assert one_line(done).endswith(" exited before its generation was ready"), done
    assert not load.failures and load.latencies, "the old master served throughout"
    (gen,) = [g for g in read_status(s.state_file)["generations"] if g["open"]]
    assert gen["master_pid"] == s.pid and gen["generation"] == 1
    assert [e["reason"] for e in s.events("master_exit")] == ["rollback"]
    s.stop()
    check_record(s.events())


def test_upgrade_not_ready_in_time_stops_the_new_master(server: Make, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.2, failed=0.5), wait_workers=2)
    gate.let(2)  # the old workers boot; the new ones will wait for tokens that never come
    done = cli("upgrade", "--state", s.state_file, "--timeout", "3")
    assert done.returncode == 1, done
    assert one_line(done) == ("rolled back: generation 2 was not ready in time (0 of 2 workers "
                              "booted)")
    (rollback,) = s.events("master_exit")
    (upgrade,) = s.events("master_start", reason="upgrade")
    assert rollback["reason"] == "rollback" and rollback["generation"] == 2
    assert rollback["in_pid"] == upgrade["in_pid"], "the new master closed its own, on TERM"
    assert s.request().startswith(b"HTTP/1.0 200")
    s.stop()
    check_record(s.events())


def test_reload_waits_for_the_new_generation_and_the_old_ones_close(server: Make) -> None:
    s = server(workers=2, interval=0.2, failed=0.5).start(wait_workers=2)
    done = cli("reload", "--state", s.state_file, "--timeout", "60")
    assert done.returncode == 0, done
    assert done.stdout.strip() == (f"reloaded: generation 2 (master {s.pid}) is ready; "
                                   "generation 1 closed")
    (gen,) = read_status(s.state_file)["generations"]
    assert (gen["generation"], gen["ready"], gen["reason"]) == (2, True, "reload")
    assert [e["reason"] for e in s.events("master_exit")] == ["reload"]
    s.stop()
    check_record(s.events())


def test_instances_are_found_in_the_default_directory(server: Make, tmp_path: Path) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    # The fallback directory (under TMPDIR) is searched too: keep this machine's out of it.
    env = {"XDG_RUNTIME_DIR": str(runtime), "TMPDIR": str(tmp_path)}
    servers = [server(workers=1, state_file=None) for _ in range(2)]
    for s in servers:
        s.start(wait_workers=1, env=env)
    for s in servers:
        s.state_file = os.path.join(runtime, "gunicorn-lifecycle",
                                    os.path.basename(default_path([f"unix:{s.sock}"])))
    wait_for(lambda: all(os.path.exists(s.state_file) for s in servers), "both state files")
    broken = runtime / "gunicorn-lifecycle" / "0123456789abcdef-v4.state"
    broken.write_bytes(b"")  # a file cut short, or not ours: the others are still shown
    done = cli("status", "--json", env=env)
    assert sorted(json.loads(line)["state_file"] for line in done.stdout.splitlines()) == sorted(
        s.state_file for s in servers), "one JSON object per instance"
    assert done.returncode == 0 and done.stderr.startswith(f"gunicorn-lifecycle: skipped: "
                                                           f"state file {broken}")
    done = cli("check", env=env)
    assert done.returncode == 2 and "2 instances found" in one_line(done) and "--state" in \
        one_line(done)
    servers[0].stop()
    done = cli("wait", "--timeout", "30", env=env)  # the only one running
    assert done.returncode == 0 and f"(master {servers[1].pid}) is ready" in done.stdout, done
    done = cli("check", env={**env, "XDG_RUNTIME_DIR": str(tmp_path / "empty")})
    assert done.returncode == 2 and "no state file in" in one_line(done)
    servers[1].stop()


def test_a_config_that_needs_the_servers_environment_says_so(tmp_path: Path) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("import os\nbind = os.environ['APP_BIND']\n")
    for command in ("status", "check"):
        assert "APP_BIND" not in os.environ
        done = cli(command, "-c", str(config))
        assert done.returncode == 2, done
        line = one_line(done)
        assert "environment variable APP_BIND, which is not set here" in line, line
        assert str(config) in line and "--state PATH" in line and "Traceback" not in line
    config.write_text("import sys\nsys.exit('set APP_ENV first')\n")
    done = cli("check", "-c", str(config))
    assert done.returncode == 2 and "SystemExit: set APP_ENV first" in one_line(done), done


def test_status_in_the_prometheus_text_format(server: Make) -> None:
    s = server(workers=2, interval=0.2, failed=0.5).start(wait_workers=2)
    assert cli("wait", "--state", s.state_file, "--timeout", "30").returncode == 0
    victim = s.events("worker_start")[0]["pid"]
    s.signal(signal.SIGKILL, victim)
    s.wait_count("worker_lost", 1)
    s.wait_count("worker_start", 3)
    done = cli("status", "--prometheus", "--state", s.state_file)
    assert done.returncode == 0, done
    samples = {(sample.name, tuple(sorted((k, v) for k, v in sample.labels.items()
                                          if k != "state_file"))): sample.value
               for family in text_string_to_metric_families(done.stdout)
               for sample in family.samples}
    mine = (("generation", "1"), ("reason", "start"))
    assert samples[("gunicorn_lifecycle_generations_open", ())] == 1
    assert samples[("gunicorn_lifecycle_workers", mine)] == 2
    assert samples[("gunicorn_lifecycle_workers_target", mine)] == 2
    assert samples[("gunicorn_lifecycle_generation_ready", mine)] == 1
    assert samples[("gunicorn_lifecycle_generation_master_alive", mine)] == 1
    assert samples[("gunicorn_lifecycle_master_starts_total", (("reason", "start"),))] == 1
    assert samples[("gunicorn_lifecycle_master_starts_total", (("reason", "restart"),))] == 0
    assert samples[("gunicorn_lifecycle_workers_lost_total", (("reason", "crash"),))] == 1
    assert samples[("gunicorn_lifecycle_master_exits_total", (("reason", "crash"),))] == 0
    s.stop()


def test_a_new_master_that_opens_no_generation_is_stopped(server: Make) -> None:
    s = server(workers=1, interval=0.2, failed=0.5).start(wait_workers=1)
    wired = "on_starting = gunicorn_lifecycle.on_starting\n"
    s.conf.write_text(s.conf.read_text().replace(wired, ""))  # the new release forgot it
    done = cli("upgrade", "--state", s.state_file, "--timeout", "5")
    assert done.returncode == 1, done
    line = one_line(done)
    assert line.startswith("rolled back: the new master ") and "opened no generation in" in line
    new = int(line.split("the new master ")[1].split()[0])
    s.wait_exit(new)  # stopped: one master left, the old one, serving
    assert s.request().startswith(b"HTTP/1.0 200") and s.live_workers(s.pid)
    s.stop()


def test_a_hup_to_the_new_master_during_an_upgrade_is_followed(server: Make,
                                                               tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2, interval=0.2, failed=0.5), wait_workers=2)
    gate.let(2)
    upgrading = subprocess.Popen([sys.executable, "-m", "gunicorn_lifecycle", "upgrade",
                                  "--state", s.state_file, "--timeout", "60"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    s.signal(signal.SIGHUP, upgrade["in_pid"])  # a logrotate's HUP, by the pidfile
    s.wait_count("master_start", 1, reason="reload")
    gate.let(4)
    out, err = upgrading.communicate(timeout=90)
    assert upgrading.returncode == 0, err
    assert out.strip() == (f"upgraded: generation 3 (master {upgrade['in_pid']}) is ready; "
                           f"master {s.pid} stopped")
    s.wait_exit()
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_count("master_exit", 3)
    check_record(s.events(), lineage=lambda g: (g > 1, g))


def test_an_upgrade_under_way_is_finished(server: Make) -> None:
    s = server(workers=1, interval=0.2, failed=0.5).start(wait_workers=1)
    s.signal(signal.SIGUSR2)  # by hand, then interrupted: both masters serve
    upgrade = s.wait_count("master_start", 1, reason="upgrade")[0]
    done = cli("upgrade", "--state", s.state_file, "--timeout", "60")
    assert done.returncode == 0, done
    assert done.stdout.strip() == (f"upgraded: generation 2 (master {upgrade['in_pid']}) is "
                                   f"ready; master {s.pid} stopped")
    s.wait_exit()
    assert [g["master_pid"] for g in read_status(s.state_file)["generations"]] == [
        upgrade["in_pid"]]
    s.signal(signal.SIGTERM, upgrade["in_pid"])
    s.wait_count("master_exit", 2)


def test_wait_closed_counts_a_killed_instance_as_closed(server: Make) -> None:
    s = server(workers=1).start(wait_workers=1)
    s.kill_all()  # master and worker: nobody is left to close the generation
    (gen,) = read_status(s.state_file)["generations"]
    assert gen["open"] and gen["master_alive"] is False
    done = cli("wait", "--state", s.state_file, "--closed", "--timeout", "5")
    assert done.returncode == 0 and done.stdout.strip() == "no generation is open", done
    done = cli("check", "--state", s.state_file)
    assert done.returncode == 1
    assert one_line(done) == f"generation 1: its master {s.pid} is not running"


def test_check_may_wait_for_health(server: Make, tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    s = gate.start(gate.server(server, workers=2), wait_workers=2)
    probe = subprocess.Popen([sys.executable, "-m", "gunicorn_lifecycle", "check", "--state",
                              s.state_file, "--timeout", "60"], stdout=subprocess.PIPE, text=True)
    gate.let(2)
    out, _ = probe.communicate(timeout=90)
    assert probe.returncode == 0 and out.startswith("ok: generation 1"), out
    s.stop()


def test_an_interrupted_command_says_so(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    state = tmp_path / "fresh.state"
    state.write_bytes(layout.new_file(8))
    state.chmod(0o600)

    def interrupted(*args: object) -> str:
        raise KeyboardInterrupt  # Ctrl-C while it waits

    monkeypatch.setattr(deploy, "wait", interrupted)
    assert main(["wait", "--state", str(state)]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("gunicorn-lifecycle: interrupted: the instance is left")
    assert len(err.strip().splitlines()) == 1


def test_health_wants_a_live_worker() -> None:
    report = {"state_file": "x", "unknown": [], "generations": [
        {"generation": 1, "master_pid": 10, "depth": 0, "open": True, "ready": True,
         "target": 0, "master_alive": True, "workers": []}]}
    with pytest.raises(Failed, match="generation 1 has no live worker"):
        health(report, "x")


def test_counters_are_printed_exactly() -> None:
    report = {"state_file": 'a "quoted"\\path', "unknown": [], "generations": [],
              "seen": {event: dict.fromkeys(reasons, 1234567)
                       for event, reasons in (("master_start", ["start"]),
                                              ("master_exit", ["stop"]),
                                              ("worker_lost", ["crash"]))}}
    (family,) = [f for f in text_string_to_metric_families(render([report]))
                 if f.name == "gunicorn_lifecycle_master_starts"]
    (sample,) = family.samples
    assert sample.value == 1234567 and sample.labels["state_file"] == 'a "quoted"\\path'
