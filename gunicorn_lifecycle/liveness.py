"""Who is alive: masters by their presence locks, workers by pid and start time.

**A master's presence** is a shared (read) lock on one byte past the end of the
file, one byte per generation record, held for as long as the master serves
that generation. The kernel drops it when the master dies, whatever killed it,
so whether a master lives is told by the kernel, not by ``/proc``: a pid of
another pid namespace, a ``/proc`` mounted with ``hidepid``, or a reused pid
cannot fool it. These are open-file-description (OFD) byte-range locks,
independent of the flock.
"""

from __future__ import annotations

import fcntl
import functools
import os
import struct

from .layout import H
from .process import boot_id, is_alive, pid_namespace
from .state import Generation, State

# struct flock: l_type, l_whence, l_start, l_len, l_pid (native layout and alignment).
_FLOCK = struct.Struct("hhqqi")
PRESENCE_AT = 1 << 40  # the first presence byte: far past any state file's data


def show_presence(fd: int, index: int, present: bool) -> None:
    """Hold (or drop) this process's presence lock for generation record ``index``."""
    kind = fcntl.F_RDLCK if present else fcntl.F_UNLCK
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, PRESENCE_AT + index, 1, 0))


def is_present(fd: int, index: int) -> bool:
    """Whether another open file description holds the presence lock of record ``index``."""
    probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, PRESENCE_AT + index, 1, 0)
    found = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))
    return bool(found[0] != fcntl.F_UNLCK)


class Here:
    """Where this process judges liveness from: its boot, pid namespace and descriptor.

    A master is alive while the kernel holds its presence lock (above); a
    worker while its pid runs with the recorded start time, which only a process
    of the same boot and pid namespace can tell.
    """

    def __init__(self, state: State, fd: int) -> None:
        self.same_boot = (state.header(H.BOOT_ID), state.header(H.BOOT_ID + 1)) == _boot()
        self.pidns = _pidns()
        self.fd = fd

    def alive(self, pid: int, started: int, pidns: int) -> bool | None:
        """Whether the recorded process runs; None when it is another namespace's to judge."""
        if not self.same_boot:
            return False
        if pidns != self.pidns:
            return None
        return is_alive(pid, started)

    def master_alive(self, gen: Generation) -> bool:
        return self.same_boot and is_present(self.fd, gen.index)


_boot = functools.cache(boot_id)
_pidns = functools.cache(pid_namespace)
