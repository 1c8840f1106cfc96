"""The options of :func:`gunicorn_lifecycle.configure`, checked once, up front."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import LifecycleError

if TYPE_CHECKING:
    from .events import Event

Callback = Callable[["Event"], object]
OnError = Literal["log", "raise"]
CALLBACKS = ("master_start", "master_exit", "worker_start", "worker_exit", "worker_lost")


@dataclass(frozen=True)
class Options:
    """Callbacks and settings serving one generation."""

    master_start: Callback | None = None
    master_exit: Callback | None = None
    worker_start: Callback | None = None
    worker_exit: Callback | None = None
    worker_lost: Callback | None = None
    state_file: str | os.PathLike[str] | None = None
    interval: float = 10.0
    failed: float = 5.0
    lock_timeout: float = 30.0
    on_error: OnError = "log"
    slots: int = 256

    def __post_init__(self) -> None:
        for name in CALLBACKS:
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise LifecycleError(f"{name} must be a callable taking one Event, or None; "
                                     f"got {value!r}")
        _number("interval", self.interval, "a number of seconds > 0", lambda v: v > 0)
        _number("failed", self.failed, "a number of seconds >= 0", lambda v: v >= 0)
        _number("lock_timeout", self.lock_timeout, "a number of seconds > 0", lambda v: v > 0)
        if self.on_error not in ("log", "raise"):
            raise LifecycleError(f'on_error must be "log" or "raise"; got {self.on_error!r}')
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or not (
            1 <= self.slots <= 65536
        ):
            raise LifecycleError(
                f"slots must be a whole number from 1 to 65536; got {self.slots!r}")
        if self.state_file is not None:
            if not isinstance(self.state_file, str | os.PathLike) or not os.fspath(self.state_file):
                raise LifecycleError("state_file must be a path (str or os.PathLike) or None "
                                     f"for the default; got {self.state_file!r}")
            object.__setattr__(self, "state_file", os.path.abspath(os.fspath(self.state_file)))

    @property
    def state_path(self) -> str | None:
        """``state_file`` as an absolute path, or None for the default."""
        return None if self.state_file is None else os.fspath(self.state_file)

    @property
    def overrun(self) -> float:
        """How old a heartbeat may get before its worker counts as lost."""
        return self.interval + self.failed


def _number(name: str, value: object, right: str, ok: Callable[[float], bool]) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise LifecycleError(f"{name} must be {right}; got {value!r}")
