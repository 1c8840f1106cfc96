"""Finding, creating, opening and checking the state file.

The file may lie in a shared directory, so it is opened without following
symbolic links, must be a regular file of this user, writable by nobody else,
and of the exact layout; anything else is refused and left untouched. A file
that is only the beginning of a fresh one (a creation cut short by a crash or a
full disk) is rebuilt: it holds nothing to lose.

Each process keeps one read-only descriptor: the lock is taken through it, and
its size is checked before the mapping is touched (a file truncated under a
mapping would kill its reader with SIGBUS). Nobody keeps a writable descriptor:
workers write through the mapping they inherit, and could not truncate the file
even after Gunicorn drops their privileges.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import mmap
import os
import stat
import sys
import weakref
from collections.abc import Iterable

from . import layout
from .errors import LifecycleError, StateDamaged
from .protocol import Words

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def default_directories() -> list[str]:
    """Where instances keep their state by default, the preferred first.

    systemd's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``), the user's
    ``$XDG_RUNTIME_DIR``, or a private directory under the temporary directory.
    """
    import tempfile  # here: a health probe given --state never needs it

    found = []
    if os.environ.get("RUNTIME_DIRECTORY"):
        found.append(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.environ.get("XDG_RUNTIME_DIR"):
        found.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "gunicorn-lifecycle"))
    found.append(os.path.join(tempfile.gettempdir(), f"gunicorn-lifecycle-{os.geteuid()}"))
    return found


def default_path(bind: Iterable[str]) -> str:
    """The same path for the same ``bind`` addresses, a different one otherwise.

    The format version is part of the name: a server of another version of this
    library never meets a file it cannot read.
    """
    import hashlib  # here: a health probe given --state never needs it

    digest = hashlib.sha256("\n".join(sorted(bind)).encode()).hexdigest()[:16]
    return os.path.join(default_directories()[0], f"{digest}-v{layout.VERSION}.state")


def find_instances() -> list[str]:
    """The state files of this version in every default directory: one per instance."""
    suffix = f"-v{layout.VERSION}.state"
    found = []
    for directory in dict.fromkeys(default_directories()):
        with contextlib.suppress(OSError):
            found += sorted(os.path.join(directory, name) for name in os.listdir(directory)
                            if name.endswith(suffix))
    return found


def make_default_directory(directory: str) -> None:
    """Create a default state directory (0700), or check that nobody else can write into it."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LifecycleError(f"state directory {directory} cannot be created ({exc.strerror}); "
                             "create it, or set state_file") from None
    info = os.lstat(directory)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid not in (os.geteuid(), 0)
            or info.st_mode & 0o022):
        raise LifecycleError(
            f"state directory {directory} is not a directory that only uid {os.geteuid()} can "
            "write into (a link, another owner, or writable by others); remove it, or set "
            "state_file")


class StateFile:
    """A mapped, validated state file and this process's read-only descriptor of it.

    Close it when done (it is a context manager): a command that polls the state
    opens one per read.
    """

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        self.size = os.fstat(fd).st_size
        if self.size < layout.HEADER_WORDS * layout.WORD:  # too short even to map
            layout.check_header(b"", self.size, path)
        self.mapping, self.fd, self._fd_is_mine = _map(path, fd, self.size, writable)
        self._buf = memoryview(self.mapping)
        try:
            self.slots = layout.check_header(self._buf, self.size, path)
        except LifecycleError:
            self.close()
            raise
        self.words = Words(self._buf, self.slots, path)
        self._header = self.words.view[: layout.H.SLOTS + 1].tolist()

    def __enter__(self) -> StateFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file and close the descriptor (what it holds of the lock goes with it)."""
        if hasattr(self, "words"):
            self.words.view.release()
        self._buf.release()
        self.mapping.close()  # before Python 3.13 the mapping owns the descriptor, and closes it
        if self._fd_is_mine:
            os.close(self.fd)

    def reopen(self) -> None:
        """In a forked child: a description of its own, of the very same file, under the same
        descriptor number (the parent's description, with its locks, is not the child's)."""
        _replace(self.fd)

    def intact(self) -> bool:
        """Whether the file still has its size: a mapping may be touched (one past a truncated
        file's end kills whoever touches it with SIGBUS). One bare system call."""
        return os.lseek(self.fd, 0, os.SEEK_END) == self.size

    def verify(self) -> None:
        """Refuse to go on if the file changed under the mapping: its size, then its header."""
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size != self.size:
            change = "truncated" if size < self.size else "grown"
            raise StateDamaged(f"state file {self.path} was {change} from {self.size} to {size} "
                                 "bytes by another program "
                                 "while in use; the lifecycle is off in this process until the "
                                 "server restarts with an intact file")
        if self.words.view[: layout.H.SLOTS + 1].tolist() != self._header:
            raise StateDamaged(f"state file {self.path}: its header was overwritten by another "
                                 "program while in use; the lifecycle is off in this process "
                                 "until the server restarts with an intact file")


def _replace(fd: int) -> None:
    """Make descriptor ``fd`` refer to a new read-only open file description of its file."""
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(own, fd, inheritable=False)
    os.close(own)


def _map(path: str, fd: int, size: int, writable: bool) -> tuple[mmap.mmap, int, bool]:
    """Map the file; the mapping, this process's one read-only descriptor, and whether that
    descriptor is to be closed apart from the mapping.

    CPython's mmap keeps a duplicate of ``fd`` (always, before Python 3.13): a
    writable one would outlive the privilege drop in every worker. That number
    is made to refer to a read-only description instead, and serves as ours.
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    if sys.version_info >= (3, 13):
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, trackfd=False)
        return mapping, os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC), True
    # The duplicate shares fd's open file description, so its file offset: an offset that
    # no other description of this file has (a thread's, past any file's end) marks it,
    # whatever other threads open or close meanwhile.
    mark = _MARK | _thread.get_ident() & 0xFFFFFFFF
    os.lseek(fd, mark, os.SEEK_SET)
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    for kept in _descriptors_of(os.fstat(fd)):
        with contextlib.suppress(OSError):
            if kept != fd and os.lseek(kept, 0, os.SEEK_CUR) == mark:
                _replace(kept)
                return mapping, kept, False
    mapping.close()
    raise LifecycleError(f"state file {path}: the descriptor of its mapping was not found")


_MARK = 1 << 42  # within any file system's largest offset (ext4: 2**44)


def _descriptors_of(target: os.stat_result) -> list[int]:
    """This process's descriptors open on the file ``target`` describes."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            info = os.fstat(int(name))
            if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(name))
    return found


def check_directory(path: str) -> None:
    """Refuse a state path whose directory is missing or not writable."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise LifecycleError(f"state_file {path}: directory {directory} does not exist; "
                             "create it or choose a state_file in an existing directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LifecycleError(f"state_file {path}: directory {directory} is not writable by "
                             f"uid {os.geteuid()}; make it writable or choose another state_file")


def open_for_server(path: str, slots: int) -> StateFile:
    """Open the state file for a master, creating (mode 0600) or rebuilding it as needed."""
    check_directory(path)
    for _ in range(3):  # a file rebuilt or created by a racing master is opened again
        try:
            fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)
        except FileNotFoundError:
            _install(path, slots, replace=False)
            continue
        except OSError as exc:
            raise _refusal(path, exc) from None
        try:
            _check_file(path, fd, owned=True)
            if _cut_short(fd):
                _install(path, slots, replace=True)
                continue
            file = StateFile(path, fd, writable=True)
            _forked_apart(file)
            return file
        finally:
            os.close(fd)
    raise LifecycleError(f"state file {path} keeps changing while it is opened; make sure one "
                         "instance uses it, or choose another state_file")


_served: weakref.WeakSet[StateFile] = weakref.WeakSet()


def _forked_apart(file: StateFile) -> None:
    """Give every process forked from this one a description of ``file`` of its own.

    A descriptor inherited across a fork shares the parent's open file
    description, and with it the parent's locks: a helper that a callback
    forks (multiprocessing, ``os.fork()``, Gunicorn's dirty arbiter) would keep
    a killed master's presence, and a held state lock, for as long as it lives.
    Gunicorn's workers get theirs the same way, before ``post_fork``.
    """
    _served.add(file)


def _after_fork() -> None:
    for file in list(_served):
        try:
            file.reopen()
        except OSError:  # no /proc: the parent's description must go all the same
            empty = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            os.dup2(empty, file.fd, inheritable=False)  # verify() then finds it damaged
            os.close(empty)


os.register_at_fork(after_in_child=_after_fork)


def open_for_reading(path: str) -> StateFile:
    """Open the state file read-only, for the status command and tests."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except FileNotFoundError:
        raise LifecycleError(f"state file {path} does not exist: is the server running, "
                             "and is this its state file?") from None
    except OSError as exc:
        raise _refusal(path, exc) from None
    try:
        _check_file(path, fd, owned=False)
        return StateFile(path, fd, writable=False)
    finally:
        os.close(fd)


def _cut_short(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if size >= layout.HEADER_WORDS * layout.WORD:  # a whole file for its capacity is not
        declared = int.from_bytes(os.pread(fd, layout.WORD, layout.H.SLOTS * layout.WORD),
                                  "little")
        if 1 <= declared <= 65536 and size == layout.file_size(declared):
            return False
    return size < layout.file_size(65536) and layout.is_cut_short(os.pread(fd, size, 0))


def _install(path: str, slots: int, replace: bool) -> None:
    """Write a fresh file under a temporary name and move it in: never half-made at ``path``."""
    temporary = f"{path}.{os.getpid()}.new"
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    except OSError as exc:
        raise _refusal(temporary, exc) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        data = layout.new_file(slots)
        if os.write(fd, data) != len(data):
            raise LifecycleError(f"state file {path} could not be written whole (is the disk "
                                 "full?); free some space or choose another state_file")
        if replace:
            os.rename(temporary, path)
        else:
            with contextlib.suppress(FileExistsError):  # another master made it: opened next
                os.link(temporary, path)
    except OSError as exc:
        raise _refusal(path, exc) from None
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # moved in by rename, or linked
            os.unlink(temporary)


def _check_file(path: str, fd: int, owned: bool) -> None:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise _refusal(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
    if not stat.S_ISREG(info.st_mode):
        raise LifecycleError(f"state file {path} is not a regular file; remove it "
                             "or choose another state_file")
    if owned and info.st_uid != os.geteuid():
        raise LifecycleError(f"state file {path} is owned by uid {info.st_uid}, not by this "
                             f"server (uid {os.geteuid()}); remove it if it is stale, "
                             "or choose another state_file")
    if owned and info.st_mode & 0o022:
        raise LifecycleError(f"state file {path} is writable by group or others (mode "
                             f"{stat.S_IMODE(info.st_mode):o}); run chmod 600 {path} "
                             "if you trust its contents, or remove it")


def _refusal(path: str, exc: OSError) -> LifecycleError:
    if exc.errno == errno.ELOOP:
        return LifecycleError(f"state file {path} is a symbolic link, which is never followed; "
                              "point state_file at the real path")
    if exc.errno == errno.EISDIR:
        return LifecycleError(f"state file {path} is a directory; choose a file path for "
                              "state_file")
    return LifecycleError(f"state file {path} cannot be opened ({exc.strerror}); fix its "
                          "permissions or choose another state_file")
