"""``gunicorn-lifecycle status``: every master and worker on the node, read-only."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import LifecycleError
from .hooks import state_path_for_config
from .status import read_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gunicorn-lifecycle",
        description="Show what the Gunicorn masters and workers of one instance are doing.")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser(
        "status", help="open generations, their masters and workers, heartbeat ages",
        description="Read the state file without taking its lock and print it.")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--state", metavar="PATH", help="the state file to read")
    where.add_argument("-c", "--config", metavar="FILE",
                       help="find the state file as the hooks do, from this Gunicorn config "
                            "(default: ./gunicorn.conf.py if present, else Gunicorn's defaults)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    try:
        path = args.state or state_path_for_config(args.config)
        report = read_status(path)
    except LifecycleError as exc:
        print(f"gunicorn-lifecycle: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    """The human form: a block per generation, a row per worker, a total."""
    lines = [f"state file: {report['state_file']}"]
    workers = late = 0
    for gen in report["generations"]:
        state = (f"closed ({gen['closed']})" if gen["closed"] else
                 "closing" if gen["closing"] else "open")
        master = "" if gen["master_alive"] is not False else " (master gone)"
        lines += ["", f"generation {gen['generation']}  master {gen['master_pid']}{master}  "
                      f"reason {gen['reason']}  {state}",
                  f"  {'pid':>8}  {'id':<16}  {'booted':<6}  heartbeat"]
        for w in gen["workers"]:
            flag = f"  LOST ({w['lost']})" if w["lost"] else "  LATE" if w["late"] else ""
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
