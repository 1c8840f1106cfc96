"""Sleep until a word of the shared mapping changes, and wake who sleeps on it: Linux's futex.

A futex is the kernel's wait queue on a memory word. It works between
processes that map the same file: a waiter sleeps while the word still holds
the value it last read, until a waker names it or a deadline passes, costs no
CPU while it sleeps, and wakes within microseconds. The standard library has
no binding for it, so it is the ``syscall`` of libc, called through
``ctypes``. Each waiter sleeps for one of 32 bits, and a waker wakes the
waiters of one bit, not all of them.

Where the system call is not known (a CPU missing from the table, a Python
without ``ctypes``), :meth:`Futex.wait` sleeps at most :data:`POLL` seconds
instead: a waiter then learns of a change that much later, and never misses it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from . import threads

POLL = 0.0005

# SYS_futex by os.uname().machine; newer ports share the generic table's 98.
_NUMBERS = {"x86_64": 202, "aarch64": 98, "arm64": 98, "riscv64": 98, "loongarch64": 98,
            "ppc64le": 221, "ppc64": 221, "s390x": 238, "i686": 240, "i386": 240,
            "armv7l": 240, "armv6l": 240}
_WAIT_BITSET, _WAKE_BITSET = 9, 10  # FUTEX_WAIT_BITSET: an absolute CLOCK_MONOTONIC deadline
_EVERYONE = 2**31 - 1
_LOW_HALF = 0 if sys.byteorder == "little" else 4  # a futex is 32 bits: the word's low half


class Futex:
    """The futex on the low half of one aligned 64-bit word of a shared, writable mapping."""

    def __init__(self, mapping: Any, word: int) -> None:
        self._kernel = _kernel()
        if self._kernel is not None:
            # An export of the mapping: it cannot be closed while this futex uses it.
            self._anchor, self._address = self._kernel.address(mapping, word * 8 + _LOW_HALF)

    def wait(self, seen: int, bit: int, deadline: float) -> None:
        """Sleep while the word's low half is that of ``seen``, until woken for ``bit`` (0-31)
        or until ``deadline`` (of ``time.monotonic()``); it may return early (a signal)."""
        if self._kernel is None:
            threads.sleep(max(0.0, min(POLL, deadline - time.monotonic())))
            return
        low = seen & 0xFFFFFFFF
        self._kernel.call(self._address, _WAIT_BITSET, low - (low >> 31 << 32), max(deadline, 0),
                          1 << bit)

    def wake(self, bit: int) -> None:
        """Wake every waiter that sleeps on the word for ``bit`` (0-31)."""
        if self._kernel is not None:
            self._kernel.call(self._address, _WAKE_BITSET, _EVERYONE, None, 1 << bit)


class _Kernel:
    """libc's ``syscall`` for futex, and the C types its arguments need."""

    def __init__(self, number: int) -> None:
        import ctypes

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        self._ctypes, self._timespec, self._number = ctypes, Timespec, number
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long

    def address(self, mapping: Any, offset: int) -> tuple[Any, int]:
        """The address of byte ``offset`` of ``mapping``, and what holds it mapped."""
        anchor = self._ctypes.c_char.from_buffer(mapping, offset)
        return anchor, int(self._ctypes.addressof(anchor))

    def call(self, address: int, operation: int, value: int, deadline: float | None,
             bitset: int) -> None:
        c = self._ctypes
        timeout = None
        if deadline is not None:
            timeout = c.byref(self._timespec(int(deadline), int(deadline % 1 * 1e9)))
        self._syscall(c.c_long(self._number), c.c_void_p(address), c.c_long(operation),
                      c.c_long(value), timeout, None, c.c_long(bitset))


@functools.cache
def _kernel() -> _Kernel | None:
    number = _NUMBERS.get(os.uname().machine)
    if number is None or not sys.platform.startswith("linux"):
        return None
    try:
        return _Kernel(number)
    except (ImportError, OSError, AttributeError):  # no ctypes, no libc, no syscall in it
        return None


def load() -> None:
    """Load ``ctypes`` and libc's ``syscall`` now, once (the hooks do, at the config's import,
    so that a master's workers share it)."""
    _kernel()
