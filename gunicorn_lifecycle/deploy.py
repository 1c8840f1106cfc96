"""The deploy commands: ``upgrade``, ``reload``, ``wait`` and ``check`` (SPEC section 7).

They send the signals an operator would send by hand, and take each next step
from what the state file says, never from a guess: a generation is *ready* when
its booted workers reached its master's worker count (:mod:`lifecycle`), and
*closed* when its master closed it or it was found dead. The masters' pids come
from the state file: no pidfile is needed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from .errors import LifecycleError
from .status import read_status

Report = dict[str, Any]
Generation = dict[str, Any]
Progress = Callable[[str], None]
POLL = 0.05


class Failed(Exception):
    """The command did not do what it was asked: one line saying what happened (exit 1)."""


class Instance:
    """One Gunicorn instance, known by its state file."""

    def __init__(self, path: str, progress: Progress) -> None:
        self.path = path
        self.progress = progress

    def read(self) -> Report:
        try:
            return read_status(self.path)
        except LifecycleError as exc:
            raise Failed(str(exc)) from None

    def until(self, found: Callable[[Report], Any], deadline: float, awaited: str) -> Any:
        """Poll the state until ``found`` returns something; Failed naming ``awaited`` at the
        deadline. ``found`` may raise Failed itself, when what it waits for cannot come."""
        while True:
            result = found(self.read())
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(awaited)
            time.sleep(POLL)

    def signal(self, pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise Failed(f"master {pid} is gone (it exited before {sig.name} reached it)") from None
        except PermissionError:
            raise Failed(f"not allowed to send {sig.name} to master {pid}: run this as the "
                         "user the server runs as") from None


def newest(report: Report, alive: bool = True) -> Generation | None:
    """The newest open generation by lineage (of a live master, with ``alive``)."""
    candidates = [g for g in report["generations"]
                  if g["open"] and (g["master_alive"] is not False or not alive)]
    return max(candidates, key=lambda g: (g["depth"], g["generation"]), default=None)


def is_open(report: Report, number: int) -> bool:
    return any(g["generation"] == number and g["open"] for g in report["generations"])


def booted(gen: Generation) -> str:
    done = sum(1 for w in gen["workers"] if w["booted"] and not w["lost"])
    return f"{done} of {gen['target']} workers booted"


def running(instance: Instance) -> Generation:
    gen = newest(instance.read())
    if gen is None:
        raise Failed(f"no running master serves {instance.path}")
    return gen


def ready(instance: Instance, number: int, deadline: float) -> Generation:
    """Wait until generation ``number`` is ready; Failed if it closes or its master dies."""

    def found(report: Report) -> Generation | None:
        gen = next((g for g in report["generations"] if g["generation"] == number), None)
        if gen is None or not gen["open"] or gen["master_alive"] is False:
            raise Failed(f"master of generation {number} exited before it was ready")
        return gen if gen["ready"] else None

    try:
        result: Generation = instance.until(found, deadline, f"generation {number} ready")
    except TimeoutError:
        gen = next(g for g in instance.read()["generations"] if g["generation"] == number)
        raise TimeoutError(f"generation {number} was not ready in time ({booted(gen)})") from None
    return result


def closed(instance: Instance, master: int, deadline: float, awaited: str) -> None:
    """Wait until no generation of ``master`` is open."""
    instance.until(lambda r: not any(g["open"] and g["master_pid"] == master
                                     for g in r["generations"]), deadline, awaited)


def upgrade(instance: Instance, timeout: float) -> str:
    """USR2, wait for the new generation ready, TERM the old master; roll back on failure.

    ``timeout`` bounds each wait: the new generation's readiness, the old
    master's closing, and a rollback's.
    """
    deadline = time.monotonic() + timeout
    try:
        old = ready(instance, running(instance)["generation"], deadline)
    except (Failed, TimeoutError) as exc:
        raise Failed(f"not upgraded: the running generation is not ready: {exc}") from None
    pid = old["master_pid"]
    highest = max(g["generation"] for g in instance.read()["generations"])
    instance.signal(pid, signal.SIGUSR2)
    instance.progress(f"USR2 sent to master {pid} (generation {old['generation']}); waiting for "
                      "the new master")

    def started(report: Report) -> Generation | None:
        if not any(g["master_pid"] == pid and g["open"] and g["master_alive"]
                   for g in report["generations"]):
            raise Failed(f"master {pid} exited during the upgrade")
        return next((g for g in report["generations"] if g["generation"] > highest
                     and g["parent_pid"] == pid and g["master_pid"] != pid), None)

    try:
        new = instance.until(started, deadline, "a new master")
    except TimeoutError:
        raise Failed(f"rolled back: no new master started within {timeout:g}s (see the "
                     "master's log; a server started as `python -m gunicorn` cannot re-execute "
                     "itself, README \"Zero-downtime deploys\")") from None
    number, new_pid = new["generation"], new["master_pid"]
    instance.progress(f"new master {new_pid} opened generation {number}; waiting until it is "
                      "ready")
    try:
        ready(instance, number, deadline)
    except (Failed, TimeoutError) as exc:
        why = str(exc)
        if isinstance(exc, TimeoutError):
            instance.progress(f"{why}; TERM to the new master {new_pid}")
            instance.signal(new_pid, signal.SIGTERM)
        try:
            instance.until(lambda r: not is_open(r, number) and (newest(r) or {}).get(
                "master_pid") == pid, time.monotonic() + timeout,
                "the old generation newest again")
        except TimeoutError:
            raise Failed(f"not rolled back within {timeout:g}s: {why}; generation {number} of "
                         f"master {new_pid} is still open") from None
        raise Failed(f"rolled back: {why}") from None
    instance.progress(f"generation {number} is ready; TERM to the old master {pid}")
    instance.signal(pid, signal.SIGTERM)
    try:
        closed(instance, pid, time.monotonic() + timeout, "the old master's generations closed")
    except TimeoutError:
        raise Failed(f"upgraded to generation {number} (master {new_pid}), but the old master "
                     f"{pid} did not close its generations within {timeout:g}s") from None
    return f"upgraded: generation {number} (master {new_pid}) is ready; master {pid} stopped"


def reload(instance: Instance, timeout: float) -> str:
    """HUP; wait until the new generation is ready and the one it superseded closed."""
    deadline = time.monotonic() + timeout
    old = running(instance)
    pid, before = old["master_pid"], old["generation"]
    highest = max(g["generation"] for g in instance.read()["generations"])
    instance.signal(pid, signal.SIGHUP)
    instance.progress(f"HUP sent to master {pid}; waiting for its new generation")

    def opened(report: Report) -> Generation | None:
        if not any(g["master_pid"] == pid and g["open"] and g["master_alive"]
                   for g in report["generations"]):
            raise Failed(f"master {pid} exited during the reload")
        return next((g for g in report["generations"]
                     if g["generation"] > highest and g["master_pid"] == pid), None)

    try:
        number = instance.until(opened, deadline, "a new generation")["generation"]
        ready(instance, number, deadline)
        instance.progress(f"generation {number} is ready; waiting until generation {before} "
                          "closes")
        instance.until(lambda r: not is_open(r, before), deadline,
                       f"generation {before} closed")
    except TimeoutError as exc:
        raise Failed(f"not reloaded within {timeout:g}s: waited for {exc}") from None
    return f"reloaded: generation {number} (master {pid}) is ready; generation {before} closed"


def wait(instance: Instance, timeout: float, until_closed: bool = False) -> str:
    """Wait until the newest generation is ready, or (``until_closed``) none is open."""
    deadline = time.monotonic() + timeout
    try:
        if until_closed:
            instance.until(lambda r: not any(g["open"] for g in r["generations"]), deadline,
                           "no generation open")
            return "no generation is open"
        gen = instance.until(lambda r: (g := newest(r)) and g["ready"] and g, deadline,
                             "the newest generation ready")
    except TimeoutError as exc:
        raise Failed(f"waited {timeout:g}s for {exc}: {describe(instance.read())}") from None
    return f"generation {gen['generation']} (master {gen['master_pid']}) is ready"


def describe(report: Report) -> str:
    gen = newest(report)
    if gen is None:
        return "no generation is open"
    return (f"generation {gen['generation']} is {'ready' if gen['ready'] else 'not ready'} "
            f"({booted(gen)})")


def check(instance: Instance) -> str:
    """The newest generation's master lives, it is ready, its heartbeats are fresh."""
    report = instance.read()
    gen = newest(report, alive=False)
    if gen is None:
        raise Failed(f"no generation is open in {instance.path}: no server runs")
    where = f"generation {gen['generation']}"
    if gen["master_alive"] is False:
        raise Failed(f"{where}: its master {gen['master_pid']} is not running")
    if not gen["ready"]:
        raise Failed(f"{where} is not ready ({booted(gen)})")
    workers = [w for w in gen["workers"] if not w["lost"]]
    late = [w for w in workers if w["late"]]
    if late:
        raise Failed(f"{where}: the heartbeat of worker {late[0]['pid']} is "
                     f"{late[0]['heartbeat_age']:.1f}s old")
    return (f"ok: {where} (master {gen['master_pid']}) is ready, {len(workers)} workers, "
            "heartbeats fresh")
