"""Finding, creating and safely opening the state file.

The file lives in a shared directory (the temporary directory by default), so
it is opened without following symbolic links, must be a regular file of ours,
private, and of the exact layout; anything else is refused and left untouched.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import tempfile
from collections.abc import Iterable

from . import layout
from .errors import LifecycleError
from .lock import Lock
from .options import Options

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def default_path(bind: Iterable[str]) -> str:
    """The same path for the same ``bind`` addresses and user, a different one otherwise.

    It lies in a directory private to the user, so that no other local user can
    make or replace the files in it.
    """
    digest = hashlib.sha256("\n".join(sorted(bind)).encode()).hexdigest()[:16]
    directory = os.path.join(tempfile.gettempdir(), f"gunicorn-lifecycle-{os.geteuid()}")
    return os.path.join(directory, f"{digest}.state")


def make_private_directory(directory: str) -> None:
    """Create the default state directory (0700), or check that an existing one is ours."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise LifecycleError(
                f"state directory {directory} is not a private directory of uid "
                f"{os.geteuid()} (a link, another owner, or open to others); remove it, or "
                "set state_file") from None


def lock_path(path: str) -> str:
    return path + ".lock"


class StateFile:
    """A mapped, validated state file."""

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        size = os.fstat(fd).st_size
        if size < layout.HEADER.size:  # an empty file cannot even be mapped
            layout.check_header(b"", size, path)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        self.view = layout.StateView(memoryview(self._map), path)


def check_directory(path: str) -> None:
    """Refuse a state path whose directory is missing or not writable."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise LifecycleError(f"state_file {path}: directory {directory} does not exist; "
                             "create it or choose a state_file in an existing directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LifecycleError(f"state_file {path}: directory {directory} is not writable by "
                             f"uid {os.geteuid()}; make it writable or choose another state_file")


def open_for_server(path: str, lock: Lock, options: Options, owner: tuple[int, int]) -> StateFile:
    """Open the state file read-write, creating it (mode 0600) if it does not exist.

    ``owner`` is the (uid, gid) of Gunicorn's workers: new files are handed to them.
    """
    check_directory(path)
    lock.open(owner)
    with lock.hold(options.lock_timeout, "on_starting"):
        try:
            fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)
        except FileNotFoundError:
            fd = _create(path, options.slots, owner)
        except OSError as exc:
            raise _refusal(path, exc) from None
        try:
            _check_file(path, fd, owners={os.geteuid(), owner[0]})
            return StateFile(path, fd, writable=True)
        finally:
            os.close(fd)


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
        _check_file(path, fd, owners=None)
        return StateFile(path, fd, writable=False)
    finally:
        os.close(fd)


def _create(path: str, slots: int, owner: tuple[int, int]) -> int:
    """Write the new file under a temporary name and link it in: never half-made at ``path``."""
    temporary = f"{path}.{os.getpid()}.new"
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    except OSError as exc:
        raise _refusal(temporary, exc) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, layout.new_file(slots))
        if owner != (os.geteuid(), os.getegid()):
            os.fchown(fd, *owner)
        os.link(temporary, path)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.unlink(temporary)
    return fd


def _check_file(path: str, fd: int, owners: set[int] | None) -> None:
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise _refusal(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
    if not stat.S_ISREG(info.st_mode):
        raise LifecycleError(f"state file {path} is not a regular file; remove it "
                             "or choose another state_file")
    if owners is not None and info.st_uid not in owners:
        raise LifecycleError(f"state file {path} is owned by uid {info.st_uid}, not by this "
                             f"server (uid {sorted(owners)}); remove it if it is stale, "
                             "or choose another state_file")
    if owners is not None and info.st_mode & 0o022:
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
