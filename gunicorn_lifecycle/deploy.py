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
from .process import start_time
from .status import read_status

Report = dict[str, Any]
Generation = dict[str, Any]
Progress = Callable[[str], None]
POLL = 0.05
RESEND = 1.0  # seconds without a new master process after USR2 before it is sent again


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
                raise TimeoutError(f"still waiting for {awaited}")
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
    return max(candidates, key=lineage, default=None)


def lineage(gen: Generation) -> tuple[int, int]:
    return gen["depth"], gen["generation"]


def is_open(report: Report, number: int) -> bool:
    return any(g["generation"] == number and g["open"] for g in report["generations"])


def serving(report: Report, master: int) -> list[Generation]:
    """The open generations of ``master``, while it lives."""
    return [g for g in report["generations"]
            if g["master_pid"] == master and g["open"] and g["master_alive"]]


def booted(gen: Generation) -> str:
    done = sum(1 for w in gen["workers"] if w["booted"] and not w["lost"])
    return f"{done} of {gen['target']} workers booted"


def running(instance: Instance) -> Generation:
    gen = newest(instance.read())
    if gen is None:
        raise Failed(f"no running master serves {instance.path}")
    return gen


def ready(instance: Instance, master: int, deadline: float) -> Generation:
    """Wait until the newest generation of ``master`` is ready (a HUP meanwhile opens a newer
    one: that one is waited for); Failed when the master exits, TimeoutError at the deadline."""
    last: list[Generation] = []

    def found(report: Report) -> Generation | None:
        gens = serving(report, master)
        if not gens:
            if start_time(master) is not None and report["unknown"]:
                return None  # a record it could not copy whole is unknown, never closed
            raise Failed(f"master {master} exited before its generation was ready")
        last[:] = [max(gens, key=lineage)]
        return last[0] if last[0]["ready"] else None

    try:
        result: Generation = instance.until(found, deadline, f"master {master} ready")
    except TimeoutError:
        raise TimeoutError(f"generation {last[0]['generation']} was not ready in time "
                           f"({booted(last[0])})") from None
    return result


def closed(instance: Instance, master: int, deadline: float, awaited: str) -> None:
    """Wait until ``master`` serves no generation: it closed them, or it died (whoever finds
    it dead closes them, with their callbacks; a dead master serves nobody meanwhile)."""
    instance.until(lambda r: not serving(r, master), deadline, awaited)


def successor(master: int) -> int | None:
    """The master that a USR2 to ``master`` started, found among its children by the
    ``GUNICORN_PID`` Gunicorn hands it (its workers, forked not executed, have none of it)."""
    try:
        with open(f"/proc/{master}/task/{master}/children") as file:
            children = file.read().split()
    except OSError:
        return None
    for child in children:
        try:
            with open(f"/proc/{child}/environ", "rb") as file:
                environ = file.read().split(b"\0")
        except OSError:
            continue
        if f"GUNICORN_PID={master}".encode() in environ:
            return int(child)
    return None


def upgrade(instance: Instance, timeout: float) -> str:
    """USR2, wait for the new generation ready, TERM the old master; roll back on failure.

    An upgrade found under way (both masters serve: one was interrupted) is
    finished instead of started again. ``timeout`` bounds each wait: the new
    generation's readiness, the old master's closing, and a rollback's.
    """
    deadline = time.monotonic() + timeout
    first = running(instance)
    report = instance.read()
    if first["parent_pid"] and serving(report, first["parent_pid"]):
        old, new = first["parent_pid"], first["master_pid"]
        instance.progress(f"an upgrade is under way (master {new} started by {old}): finishing it")
    else:
        old = first["master_pid"]
        try:
            ready(instance, old, deadline)
        except (Failed, TimeoutError) as exc:
            raise Failed(f"not upgraded: the running generation is not ready: {exc}") from None
        new = start_successor(instance, old, deadline, timeout)
    try:
        gen = ready(instance, new, deadline)
    except (Failed, TimeoutError) as exc:
        raise Failed(roll_back(instance, old, new, str(exc), timeout)) from None
    instance.progress(f"generation {gen['generation']} is ready; TERM to the old master {old}")
    instance.signal(old, signal.SIGTERM)
    try:
        closed(instance, old, time.monotonic() + timeout, "the old master's generations closed")
    except TimeoutError:
        raise Failed(f"upgraded to generation {gen['generation']} (master {new}), but the old "
                     f"master {old} did not close its generations within {timeout:g}s") from None
    return (f"upgraded: generation {gen['generation']} (master {new}) is ready; master {old} "
            "stopped")


def start_successor(instance: Instance, old: int, deadline: float, timeout: float) -> int:
    """USR2 to ``old``; the new master's pid, once its generation is open in this state file.

    Gunicorn ignores a USR2 to a master that a USR2 started until it has found
    its parent gone and promoted itself (up to a second after): the signal is
    sent again while no new master process exists, and that is said.
    """
    highest = max(g["generation"] for g in instance.read()["generations"])
    instance.signal(old, signal.SIGUSR2)
    instance.progress(f"USR2 sent to master {old}; waiting for the new master")
    sent, forked = [time.monotonic()], [0]

    def started(report: Report) -> int | None:
        if not serving(report, old):
            raise Failed(f"master {old} exited during the upgrade")
        found = next((g["master_pid"] for g in report["generations"]
                      if g["generation"] > highest and g["parent_pid"] == old
                      and g["master_pid"] != old), None)
        if found is not None:
            return int(found)
        child = successor(old)
        if child is not None:
            forked[0] = child
        elif forked[0]:  # it was started, and is gone before it opened its generation
            raise Failed(f"rolled back: the new master {forked[0]} exited before it opened "
                         "a generation (see the master's log)")
        elif time.monotonic() - sent[0] > RESEND:
            instance.progress(f"master {old} ignored USR2 (Gunicorn ignores it until it has "
                              "promoted a master started by USR2, up to a second after its "
                              "parent exited): sent again")
            instance.signal(old, signal.SIGUSR2)
            sent[0] = time.monotonic()
        return None

    try:
        new: int = instance.until(started, deadline, "a new master")
    except TimeoutError:
        stray = successor(old)
        if stray is None:
            raise Failed(f"rolled back: no new master started within {timeout:g}s (see the "
                         "master's log; a server started as `python -m gunicorn` may fail to "
                         "re-execute itself, README \"Zero-downtime deploys\")") from None
        instance.signal(stray, signal.SIGTERM)
        raise Failed(f"rolled back: the new master {stray} opened no generation in "
                     f"{instance.path} within {timeout:g}s, and was stopped (is on_starting "
                     "wired in its config? A gunicorn_lifecycle of another state file format "
                     "needs a full restart instead)") from None
    instance.progress(f"new master {new} started; waiting until its generation is ready")
    return new


def roll_back(instance: Instance, old: int, new: int, why: str, timeout: float) -> str:
    """Stop the new master if it lives; the outcome, once the old generation is newest again."""
    if serving(instance.read(), new):
        instance.progress(f"{why}; TERM to the new master {new}")
        instance.signal(new, signal.SIGTERM)
    try:  # a dead new master is known dead at once (its presence lock is gone)
        instance.until(lambda r: not serving(r, new)
                       and (newest(r) or {}).get("master_pid") == old,
                       time.monotonic() + timeout, "the old generation newest again")
    except TimeoutError:
        return (f"not rolled back within {timeout:g}s: {why}; master {new} still serves "
                f"{instance.path}")
    return f"rolled back: {why}"


def reload(instance: Instance, timeout: float) -> str:
    """HUP; wait until the new generation is ready and the ones it superseded closed."""
    deadline = time.monotonic() + timeout
    pid = running(instance)["master_pid"]
    report = instance.read()
    superseded = [g["generation"] for g in serving(report, pid)]
    closing = ", ".join(map(str, superseded))
    highest = max(g["generation"] for g in report["generations"])
    instance.signal(pid, signal.SIGHUP)
    instance.progress(f"HUP sent to master {pid}; waiting for its new generation")

    def opened(report: Report) -> Generation | None:
        if not serving(report, pid):
            raise Failed(f"master {pid} exited during the reload")
        return next((g for g in report["generations"]
                     if g["generation"] > highest and g["master_pid"] == pid), None)

    try:
        instance.until(opened, deadline, "a new generation")
        gen = ready(instance, pid, deadline)
        instance.progress(f"generation {gen['generation']} is ready; waiting until {closing} "
                          "closed")
        instance.until(lambda r: not any(is_open(r, n) for n in superseded), deadline,
                       f"generation {closing} closed")
    except TimeoutError as exc:
        raise Failed(f"not reloaded within {timeout:g}s: {exc}") from None
    return (f"reloaded: generation {gen['generation']} (master {pid}) is ready; generation "
            f"{closing} closed")


def wait(instance: Instance, timeout: float, until_closed: bool = False,
         deadline: float | None = None) -> str:
    """Wait until the newest generation is ready, or (``until_closed``) none is open (a
    generation whose master died counts as closed: it serves nobody). ``deadline``: when the
    ``timeout`` given began earlier (the wait for the state file to be made)."""
    deadline = time.monotonic() + timeout if deadline is None else deadline
    try:
        if until_closed:
            instance.until(lambda r: newest(r) is None, deadline, "every generation closed")
            return "no generation is open"
        gen = instance.until(lambda r: (g := newest(r)) and g["ready"] and g, deadline,
                             "the newest generation ready")
    except TimeoutError:
        raise Failed(f"waited {timeout:g}s: {describe(instance.read())}") from None
    return f"generation {gen['generation']} (master {gen['master_pid']}) is ready"


def describe(report: Report) -> str:
    gen = newest(report)
    if gen is None:
        return "no generation is open"
    state = "ready" if gen["ready"] else f"not ready ({booted(gen)})"
    return f"generation {gen['generation']} (master {gen['master_pid']}) is open and {state}"


def check(instance: Instance, timeout: float = 0.0, mode: str = "ready") -> str:
    """The health probe (see :func:`health`); ``timeout``: how long it may take to get
    there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return health(instance.read(), instance.path, mode)
        except Failed:
            if time.monotonic() >= deadline:
                raise
        time.sleep(POLL)


def health(report: Report, path: str, mode: str = "ready") -> str:
    """Three questions (SPEC section 7), each answered with one line:

    - ``"ready"`` (a readiness probe): some open generation is ready, its master
      alive and its heartbeats fresh; during an upgrade or a reload the old one
      serves until the new one is ready;
    - ``"newest"`` (a deploy is done): the newest generation is, itself;
    - ``"alive"`` (a liveness probe): the newest master lives and its workers
      beat, ready or not (a long boot is no reason to kill it).

    Failed, with the reason, otherwise.
    """
    gen = newest(report, alive=False)
    if gen is None:
        raise Failed(f"no generation is open in {path}: no server runs")
    if mode == "alive":
        return _alive(gen)
    if mode == "newest":
        return _serves(gen)
    candidates = sorted((g for g in report["generations"] if g["open"]),
                        key=lineage, reverse=True)
    reasons = []
    for candidate in candidates:
        try:
            line = _serves(candidate)
        except Failed as why:
            reasons.append(str(why))
            continue
        if candidate is not gen:
            line += f"; {reasons[0]}"  # the newest one, booting
        return line
    raise Failed(reasons[0])


def _serves(gen: Generation) -> str:
    """ok when ``gen`` is ready, its master alive and its live workers' heartbeats fresh."""
    where = f"generation {gen['generation']}"
    if gen["master_alive"] is False:
        raise Failed(f"{where}: its master {gen['master_pid']} is not running")
    if not gen["ready"]:
        raise Failed(f"{where} is not ready ({booted(gen)})")
    workers = _beating(gen)
    if not workers:
        raise Failed(f"{where} has no live worker")
    return (f"ok: {where} (master {gen['master_pid']}) is ready, {len(workers)} workers, "
            "heartbeats fresh")


def _alive(gen: Generation) -> str:
    """ok when ``gen``'s master lives and its live workers' heartbeats are fresh."""
    where = f"generation {gen['generation']}"
    if gen["master_alive"] is False:
        raise Failed(f"{where}: its master {gen['master_pid']} is not running")
    workers = _beating(gen)
    state = "ready" if gen["ready"] else f"starting, {booted(gen)}"
    return (f"ok: {where} (master {gen['master_pid']}) is alive ({state}), {len(workers)} "
            "workers beating")


def _beating(gen: Generation) -> list[dict[str, Any]]:
    """The live workers of ``gen``; Failed when the heartbeat of one of them is late."""
    workers = [w for w in gen["workers"] if not w["lost"]]
    late = [w for w in workers if w["late"]]
    if late:
        raise Failed(f"generation {gen['generation']}: the heartbeat of worker "
                     f"{late[0]['pid']} is {late[0]['heartbeat_age']:.1f}s old")
    return workers
