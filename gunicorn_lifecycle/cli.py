"""``gunicorn-lifecycle``: read the state of the instances on this node, and drive deploys.

Exit status: 0 done, 1 failed (one line says what happened), 2 bad usage
(including a state file or config that cannot be used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import deploy, prometheus
from .errors import LifecycleError
from .statefile import default_directories, find_instances, open_for_reading
from .status import read_status


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        progress("interrupted: the instance is left as it is now (see `gunicorn-lifecycle "
                 "status`; `upgrade` again finishes an upgrade under way)")
        return 130


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + getattr(args, "timeout", 0.0)
    steps = Steps(quiet=getattr(args, "quiet", False))
    try:
        if args.command == "status":
            return status(args)
        # A server just started may not have made its state file yet: wait waits for it.
        path = appeared(args, deadline, steps) if args.command == "wait" else one_instance(args)
        open_for_reading(path).close()  # a file that cannot be used is bad usage, before a signal
    except LifecycleError as exc:
        steps.done()
        progress(str(exc))
        return 2
    instance = deploy.Instance(path, steps)
    try:
        if args.command == "wait":
            message = deploy.wait(instance, args.timeout, args.closed, deadline)
        elif args.command == "check":
            message = deploy.check(instance, args.timeout, args.mode)
        else:
            message = getattr(deploy, args.command)(instance, args.timeout)
    except deploy.Failed as exc:
        steps.done()
        return report(args, path, False, str(exc))
    steps.done()
    return report(args, path, True, message)


def appeared(args: argparse.Namespace, deadline: float, steps: Steps) -> str:
    """The instance to wait for, waiting (up to ``deadline``) for its state file to exist."""
    said = False
    while True:
        try:
            path = one_instance(args)
            if os.path.exists(path):
                return path
        except LifecycleError:  # no instance found yet, by discovery
            if time.monotonic() >= deadline:
                raise
            path = ""
        if time.monotonic() >= deadline:
            return path  # its absence is then said, as bad usage
        if not said:
            steps(f"waiting for the state file {path or 'of an instance'} to be made")
            said = True
        time.sleep(deploy.POLL)


class Steps:
    """Progress on stderr: a live line on a terminal, one plain line per step elsewhere (under
    systemd, in CI), none with ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live = sys.stderr.isatty()
        self._shown = False

    def __call__(self, line: str) -> None:
        if self.quiet:
            return
        if self.live:
            print(f"\r\x1b[Kgunicorn-lifecycle: {line}", end="", file=sys.stderr, flush=True)
            self._shown = True
        else:
            progress(line)

    def done(self) -> None:
        """End the live line, if one was shown, before the outcome is printed."""
        if self._shown:
            print(file=sys.stderr, flush=True)
            self._shown = False


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="gunicorn-lifecycle",
        description="Show and drive the Gunicorn instances whose hooks use gunicorn_lifecycle.")
    commands = top.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status", help="open generations, their masters and workers, heartbeat ages",
        description="Read the state without taking its lock and print it. Without --state or "
                    "-c: every instance in the default directory.")
    where(status, "print one JSON object per instance (one per line)")
    status.add_argument("--prometheus", action="store_true",
                        help="print the Prometheus text format (node_exporter's textfile "
                             "collector)")
    for name, text in (
        ("upgrade", "USR2 to the newest master, wait until its successor's generation is ready, "
                    "then TERM it; if the new master dies or is not ready in time, TERM the new "
                    "master and exit 1 with \"rolled back\""),
        ("reload", "HUP to the newest master; wait until the new generation is ready and the "
                   "one it superseded closed"),
        ("wait", "wait until the newest generation is ready (--closed: until none is open)"),
        ("check", "readiness probe: exit 0 while some open generation is ready, its master "
                  "alive and its heartbeats fresh (during an upgrade the old one serves); "
                  "else 1 with the reason"),
    ):
        command = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] +
                                      ".")
        where(command, "print the outcome as one JSON object")
        if name == "check":  # a probe answers at once, unless told it may wait
            command.add_argument("--timeout", type=not_negative, default=0.0, metavar="SECONDS",
                                 help="wait up to this long for a healthy state (default: 0)")
            mode = command.add_mutually_exclusive_group()
            mode.add_argument("--newest", dest="mode", action="store_const", const="newest",
                              default="ready", help="the deploy is done: exit 0 when the newest "
                                                    "generation is ready")
            mode.add_argument("--alive", dest="mode", action="store_const", const="alive",
                              help="liveness probe: exit 0 while the newest master lives and "
                                   "its workers beat, ready or not")
        else:
            command.add_argument("--timeout", type=positive, default=120.0, metavar="SECONDS",
                                 help="longest wait for each step (default: 120)")
            command.add_argument("--quiet", action="store_true",
                                 help="no progress on stderr (by default: a live line on a "
                                      "terminal, one plain line per step elsewhere)")
        if name == "wait":
            command.add_argument("--closed", action="store_true",
                                 help="wait until no generation is open (the server stopped); "
                                      "a state file not made yet is waited for too")
    return top


def where(command: argparse.ArgumentParser, json_help: str) -> None:
    group = command.add_mutually_exclusive_group()
    group.add_argument("--state", metavar="PATH", help="the instance's state file")
    group.add_argument("-c", "--config", metavar="FILE",
                       help="find the state file as the hooks do, from this Gunicorn config "
                            "(it is executed, the application is not loaded)")
    command.add_argument("--json", action="store_true", help=json_help)


def positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def not_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def paths(args: argparse.Namespace) -> list[str]:
    if args.state:
        return [args.state]
    if args.config:
        from .hooks import state_path_for_config  # Gunicorn's config: only when asked for

        return [state_path_for_config(args.config)]
    found = find_instances()
    if not found:
        raise LifecycleError(f"no state file in {', '.join(dict.fromkeys(default_directories()))}"
                             "; pass --state PATH or -c gunicorn.conf.py (the master logs its "
                             "state file at start)")
    return found


def one_instance(args: argparse.Namespace) -> str:
    """The instance a command drives: the one given, or the only one found running."""
    found = paths(args)
    running = [p for p in found if _serves(p)]
    if len(running) == 1 or (len(found) == 1 and not running):
        return (running or found)[0]
    raise LifecycleError(f"{len(running) or len(found)} instances found "
                         f"({', '.join(running or found)}); pass --state PATH or -c "
                         "gunicorn.conf.py to choose one")


def _serves(path: str) -> bool:
    try:
        return deploy.newest(read_status(path)) is not None
    except LifecycleError:
        return False


def status(args: argparse.Namespace) -> int:
    """Print the state; found by discovery, a file that cannot be read is skipped, and said."""
    found, reports = paths(args), []
    for path in found:
        try:
            reports.append(read_status(path))
        except LifecycleError as exc:
            if args.state or args.config or len(found) == 1:
                raise
            progress(f"skipped: {exc}")
    if args.prometheus:
        print(prometheus.render(reports), end="")
    elif args.json:
        print("\n".join(json.dumps(r) for r in reports))
    else:
        print("\n\n".join(render(r) for r in reports))
    return 0


def progress(line: str) -> None:
    print(f"gunicorn-lifecycle: {line}", file=sys.stderr, flush=True)


def report(args: argparse.Namespace, path: str, ok: bool, message: str) -> int:
    if args.json:
        print(json.dumps({"command": args.command, "ok": ok, "message": message,
                          "state_file": path}))
    elif ok:
        print(message)
    else:
        progress(message)
    return 0 if ok else 1


def render(report: dict[str, Any]) -> str:
    """The human form: a block per generation, a row per worker, a total."""
    lines = [f"state file: {report['state_file']}"]
    workers = late = 0
    for gen in report["generations"]:
        state = (f"closed ({gen['closed']})" if gen["closed"] else
                 "closing" if gen["closing"] else "ready" if gen["ready"] else "starting")
        master = "" if gen["master_alive"] is not False else " (master gone)"
        lines += ["", f"generation {gen['generation']}  master {gen['master_pid']}{master}  "
                      f"reason {gen['reason']}  {state}  target {gen['target']}",
                  f"  {'pid':>8}  {'id':<16}  {'booted':<6}  heartbeat"]
        for w in gen["workers"]:
            flag = f"  LOST ({w['lost']})" if w["lost"] else "  LATE" if w["late"] else ""
            if w["leader"]:
                flag += f"  leader (term {gen['leader']['term']})"
            lines.append(f"  {w['pid']:>8}  {w['id']:<16}  {'yes' if w['booted'] else 'no':<6}  "
                         f"{w['heartbeat_age']:.1f}s{flag}")
            workers += not w["lost"]
            late += w["late"]
    if report["unknown"]:
        lines += ["", f"unknown (being written, or left half-written): "
                      f"{', '.join(report['unknown'])}"]
    lines += ["", f"total: {len(report['generations'])} generations, {workers} workers, "
                  f"{late} late"]
    return "\n".join(lines)
