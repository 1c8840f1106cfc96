"""An application whose workers boot only when the test lets them: one token each.

A worker's import of ``gated_app`` takes a token file from ``$BOOT_TOKENS`` (any
``any.*``, or the ``pid.<its pid>`` one) and loads the example app; with none
there, it waits. ``$BROKEN_DEPLOY``, when that
file exists, makes the import fail instead (a deploy of broken code).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Server

GATED_APP = """
import os, signal, sys, time


def take(path):
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


if os.path.exists(os.environ.get("BROKEN_DEPLOY", "/nonexistent")):
    raise ImportError("this deploy is broken")
tokens = os.environ.get("BOOT_TOKENS")
if tokens:  # a worker stopped while it waits exits at once, as one loading its app would
    gunicorns = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    mine = "pid.%d" % os.getpid()
    while not any(take(os.path.join(tokens, name)) for name in os.listdir(tokens)
                  if name.startswith("any.") or name == mine):
        time.sleep(0.02)
    signal.signal(signal.SIGTERM, gunicorns)

from example_app.app import app
"""


class Gate:
    """Boot tokens for a server's workers, and the switch that breaks its next deploy."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tokens = directory / "tokens"
        self.tokens.mkdir(exist_ok=True)
        self.broken = directory / "broken"
        self._issued = 0
        (directory / "gated_app.py").write_text(GATED_APP)

    @property
    def settings(self) -> str:
        return f"import sys\nsys.path.insert(0, {str(self.directory)!r})\n"

    @property
    def env(self) -> dict[str, str]:
        return {"BOOT_TOKENS": str(self.tokens), "BROKEN_DEPLOY": str(self.broken)}

    def let(self, workers: int) -> None:
        """Let ``workers`` more workers boot, whichever come first."""
        for _ in range(workers):
            self._issued += 1
            (self.tokens / f"any.{self._issued}").touch()

    def let_pid(self, pid: int) -> None:
        """Let the worker ``pid`` boot."""
        (self.tokens / f"pid.{pid}").touch()

    def server(self, make: Callable[..., Server], **options: Any) -> Server:
        """A server of ``make`` that runs the gated application."""
        options["settings"] = self.settings + options.get("settings", "")
        s = make(**options)
        s.app = "gated_app:app"
        return s

    def start(self, s: Server, wait_workers: int | None = None) -> Server:
        """Start ``s``; with ``wait_workers``, wait until that many workers are registered
        (their worker_start comes once they boot)."""
        s.start(env=self.env)
        if wait_workers:
            s.wait_registered(wait_workers)
        return s
