"""``python -m benchmarks`` (``make bench``): every benchmark, its table, and a summary.

Exits 1 when a budget fails, so that ``make bench`` says so too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from . import deploy, heartbeat, hook_latency, leadership, memory, sweep, throughput, turn
from .report import Table

# Each takes a work directory, the number of repeats, and whether this is a quick run.
BENCHMARKS: dict[str, Callable[[Path, int, bool], Table]] = {
    "heartbeat": heartbeat.run,
    "hooks": hook_latency.run,
    "throughput": throughput.run,
    "sweep": sweep.run,
    "memory": memory.run,
    "deploy": deploy.run,
    "turn": turn.run,
    "leadership": leadership.run,
    "breakdown": heartbeat.breakdown,
}
DEFAULT = [name for name in BENCHMARKS if name != "breakdown"]  # a study: --only breakdown
# About 8 minutes in all on a 2-core machine (3.5 of them for the heartbeat, 2 for deploys).
DEFAULT_REPEATS = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"runs per figure, each figure is their median "
                             f"(default {DEFAULT_REPEATS}; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="short windows: a smoke test of the suite, not figures to trust")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS),
                        help="run only this benchmark (may be repeated)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that every Gunicorn is still killed

    tables: list[Table] = []
    with tempfile.TemporaryDirectory(prefix="gunicorn-lifecycle-bench-") as workdir:
        for name in args.only or DEFAULT:
            started = time.monotonic()
            table = BENCHMARKS[name](Path(workdir) / name, repeats, args.quick)
            table.notes.append(f"took {time.monotonic() - started:.0f} s")
            tables.append(table)
            print(table.render(), end="\n\n", flush=True)
    return _summary(tables)


def _summary(tables: list[Table]) -> int:
    """Print one line per budget; 1 if any failed."""
    print("== summary ==")
    failed = 0
    for table in tables:
        for row in table.rows:
            if row.budget is not None:
                failed += row.verdict == "FAIL"
                print(f"{row.verdict}  {table.title.split('.')[0]}. {row.name}: "
                      f"{row.budget.describe(row.unit)}")
    checked = sum(row.budget is not None for table in tables for row in table.rows)
    print(f"{checked - failed} of {checked} budgets kept"
          + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
