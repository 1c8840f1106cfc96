"""The options of :func:`gunicorn_lifecycle.configure`, checked once, up front."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import LifecycleError

if TYPE_CHECKING:
    from .events import Event

Callback = Callable[["Event"], object]
Callbacks = Callback | Sequence[Callback] | None
OnError = Literal["log", "raise"]
SystemdMode = bool | Literal["auto"]
CALLBACKS = ("master_start", "master_exit", "master_ready", "worker_start", "worker_exit",
             "worker_lost", "leader_start", "leader_stop")


@dataclass(frozen=True)
class Options:
    """Callbacks and settings serving one generation."""

    callback_lists: dict[str, tuple[Callback, ...]] = field(default_factory=dict)
    state_file: str | None = None
    interval: float = 10.0
    failed: float = 5.0
    lock_timeout: float = 30.0
    on_error: OnError = "log"
    slots: int = 256
    systemd: SystemdMode = "auto"
    warmup: str | Callable[[Any], object] | None = None

    @classmethod
    def build(cls, callbacks: dict[str, Callbacks], state_file: str | os.PathLike[str] | None,
              base: str, interval: float, failed: float, lock_timeout: float,
              on_error: OnError, slots: int, systemd: SystemdMode = "auto",
              warmup: str | Callable[[Any], object] | None = None) -> Options:
        """Check every option; LifecycleError naming the first bad one and what would be right.

        A relative ``state_file`` is taken relative to ``base`` (the config file's
        directory), so that Gunicorn's ``chdir`` or a ``USR2`` re-exec finds the same file.
        """
        lists = {name: _callables(name, value) for name, value in callbacks.items()}
        _number("interval", interval, "a number of seconds > 0", lambda v: v > 0)
        _number("failed", failed, "a number of seconds >= 0", lambda v: v >= 0)
        _number("lock_timeout", lock_timeout, "a number of seconds > 0", lambda v: v > 0)
        if on_error not in ("log", "raise"):
            raise LifecycleError(f'on_error must be "log" or "raise"; got {on_error!r}')
        if not (systemd == "auto" or isinstance(systemd, bool)):
            raise LifecycleError(f'systemd must be "auto", True or False; got {systemd!r}')
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 65536:
            raise LifecycleError(f"slots must be a whole number from 1 to 65536; got {slots!r}")
        if not (warmup is None or callable(warmup) or (isinstance(warmup, str)
                and warmup.startswith("/"))):
            raise LifecycleError("warmup must be a path to request in each new worker (\"/healthz"
                                 "\"), a callable taking Gunicorn's worker, or None; got "
                                 f"{warmup!r}")
        path = None
        if state_file is not None:
            if not isinstance(state_file, str | os.PathLike) or not os.fspath(state_file):
                raise LifecycleError("state_file must be a path (str or os.PathLike) or None "
                                     f"for the default; got {state_file!r}")
            path = os.path.abspath(os.path.join(base, os.fspath(state_file)))
        return cls(lists, path, interval, failed, lock_timeout, on_error, slots, systemd, warmup)

    def callbacks(self, name: str) -> tuple[Callback, ...]:
        return self.callback_lists.get(name, ())

    @property
    def overrun(self) -> float:
        """How old a heartbeat may get before its worker counts as lost."""
        return self.interval + self.failed


def _callables(name: str, value: Callbacks) -> tuple[Callback, ...]:
    found = () if value is None else tuple(value) if isinstance(value, list | tuple) else (value,)
    for one in found:
        if not callable(one):
            raise LifecycleError(f"{name} must be a callable taking one Event, a list of them, "
                                 f"or None; got {value!r}")
    return found


def _number(name: str, value: object, right: str, ok: Callable[[float], bool]) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise LifecycleError(f"{name} must be {right}; got {value!r}")
