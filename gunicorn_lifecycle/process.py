"""Liveness of a process, proven by its pid *and* its start time, in its own pid namespace.

A pid alone is not an identity: the kernel reuses it. The start time (field 22
of ``/proc/<pid>/stat``, in clock ticks since boot) pins one incarnation. Both
mean something only in the pid namespace and the boot they were read in.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """The start time of a running (non-zombie) process, or None if there is none."""
    fields = _stat(pid)
    if fields is None or len(fields) < 20 or fields[0] == b"Z":
        return None
    return int(fields[19])


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, a tracer), not merely slow: its state is T or t."""
    fields = _stat(pid)
    return fields is not None and fields[:1] in ([b"T"], [b"t"])


def condition(pid: int, started: int) -> str:
    """``"gone"``, ``"stopped"`` or ``"running"``: the recorded process, in one read of /proc."""
    fields = _stat(pid)
    if fields is None or len(fields) < 20 or fields[0] == b"Z" or int(fields[19]) != started:
        return "gone"
    return "stopped" if fields[0] in (b"T", b"t") else "running"


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` from the third on (the state), or None if there is no
    such process."""
    if pid <= 0:
        return None
    try:  # os.open, not open(): no buffered-IO objects, on a path run in every post_fork
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return stat[stat.rfind(b")") + 2 :].split()


def is_alive(pid: int, started: int) -> bool:
    """True when ``pid`` runs and is the same process that was recorded with ``started``."""
    return started != 0 and start_time(pid) == started


_own: tuple[int, int] = (0, 0)  # (pid, start time) of this process, read once per process


def own_start_time() -> int:
    """This process's start time; it always exists. Read once per process (a forked worker
    reads its own): a read of ``/proc`` is a good part of a worker's boot."""
    global _own
    pid = os.getpid()
    if _own[0] != pid:
        started = start_time(pid)
        assert started is not None
        _own = (pid, started)
    return _own[1]


def pid_namespace() -> int:
    """This process's pid namespace (its inode): pids of another one cannot be judged here."""
    return os.stat("/proc/self/ns/pid").st_ino


def boot_id() -> tuple[int, int]:
    """This boot's identity (two words): pids, start times, clocks of another boot mean nothing."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        raw = bytes.fromhex(f.read().strip().replace("-", ""))
    return int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little",
                                                                           signed=True)
