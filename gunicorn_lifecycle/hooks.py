"""Gunicorn's server hooks, and ``configure()``: the only module that knows Gunicorn.

Each hook translates what Gunicorn hands it (the arbiter, a worker) into the
master's or the worker's side of the lifecycle. A hook never takes the server
down for a fault of ours: only a refused state file at start, and a user
callback under ``on_error="raise"``, reach Gunicorn. A state file found damaged
while in use turns the lifecycle off in that process, which goes on serving.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from gunicorn.systemd import sd_notify

from . import futex
from .errors import LifecycleError, StateDamaged
from .events import CallbackFailed
from .lock import LockTimeout
from .master import Master
from .options import Callbacks, OnError, Options, SystemdMode
from .statefile import default_path, make_default_directory, open_for_server
from .systemd import Systemd
from .transaction import Transactions
from .worker import Worker

futex.load()  # here, in the master before it forks (its workers share it), not in on_starting
_HANDED_DOWN = "GUNICORN_LIFECYCLE_STATE"  # "<master pid>:<path>", for the master's USR2 child
HOOKS = ("on_starting", "on_reload", "post_fork", "post_worker_init", "worker_exit",
         "worker_abort", "child_exit", "nworkers_changed", "on_exit")
# Gunicorn executes its config file as a module of this name.
_CONFIG_MODULE = "__config__"


class _Process:
    """What this process knows: the latest options, and its role once it has one."""

    configured: Options | None = None
    loading: dict[str, Any] | None = None  # the namespace of the config that configured last
    call_site = ""
    starting_failed = False
    off = False  # the state file was found damaged: the lifecycle is off here
    master: Master | None = None
    worker: Worker | None = None
    notify_socket: str | None = None  # systemd's, held back from Gunicorn's early READY=1
    config: Any = None  # Gunicorn's config object that the current generation was opened with


_here = _Process()


def configure(
    *,
    master_start: Callbacks = None,
    master_exit: Callbacks = None,
    master_ready: Callbacks = None,
    worker_start: Callbacks = None,
    worker_exit: Callbacks = None,
    worker_lost: Callbacks = None,
    leader_start: Callbacks = None,
    leader_stop: Callbacks = None,
    state_file: str | os.PathLike[str] | None = None,
    interval: float = 10.0,
    failed: float = 5.0,
    lock_timeout: float = 30.0,
    on_error: OnError = "log",
    slots: int = 256,
    systemd: SystemdMode = "auto",
    warmup: str | Callable[[Any], object] | None = None,
) -> None:
    """Set the callbacks and options; call it once from ``gunicorn.conf.py``.

    Each callback option takes a callable or a list of them, run in order.
    Raises LifecycleError for a bad option, or for a second call while the same
    config is loaded (naming both). Gunicorn executes the config again on
    ``HUP``: that call sets what the generation opened by the reload uses.
    """
    caller = sys._getframe(1)
    site = f"{caller.f_code.co_filename}:{caller.f_lineno}"
    config = _config_namespace(caller)
    if config is _here.loading:
        raise LifecycleError(
            f"configure() was called twice while one config was loaded, at {_here.call_site} "
            f"and at {site}; call it once, and pass a list where callbacks should combine "
            "(worker_exit=[first, second])")
    options = Options.build(
        {"master_start": master_start, "master_exit": master_exit, "master_ready": master_ready,
         "worker_start": worker_start, "worker_exit": worker_exit, "worker_lost": worker_lost,
         "leader_start": leader_start, "leader_stop": leader_stop},
        state_file, os.path.dirname(os.path.abspath(config.get("__file__") or "x")),
        interval, failed, lock_timeout, on_error, slots, systemd, warmup)
    _here.configured, _here.loading, _here.call_site = options, config, site


def _config_namespace(frame: FrameType) -> dict[str, Any]:
    """The globals of the config file being executed: of Gunicorn's config module if
    ``configure()`` was reached from it (through modules it imports too), else the caller's."""
    found, outer = frame.f_globals, frame.f_back
    while outer is not None:
        if outer.f_globals.get("__name__") == _CONFIG_MODULE:
            found = outer.f_globals
        outer = outer.f_back
    return found


def state_path_for_config(config_file: str) -> str:
    """The state file the hooks use when Gunicorn runs with ``config_file``.

    The config file is executed as Gunicorn executes it (the application is
    not loaded): its ``configure()`` call gives ``state_file``, its ``bind``
    the default path.
    """
    import runpy  # here, not at the top: only the command line needs it, never a worker

    from gunicorn.config import Config

    if not os.path.isfile(config_file):
        what = "is not a file" if os.path.exists(config_file) else "does not exist"
        raise LifecycleError(f"config file {config_file} {what}")
    cfg = Config()
    _here.configured = _here.loading = None
    instead = ("; or pass --state PATH instead of -c (the master logs its state file at "
               "start)")
    try:
        namespace = runpy.run_path(config_file, run_name=_CONFIG_MODULE)
        if "bind" in namespace:
            cfg.set("bind", namespace["bind"])
    except LifecycleError as exc:
        raise LifecycleError(f"{exc}{instead}") from None
    except (Exception, SystemExit) as exc:  # a config may sys.exit() where it lacks something
        missing = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
        if isinstance(missing, str) and missing not in os.environ:  # os.environ["..."]
            raise LifecycleError(f"config file {config_file} reads the environment variable "
                                 f"{missing}, which is not set here: set it as the server has "
                                 f"it{instead}") from None
        raise LifecycleError(f"config file {config_file} failed to load: "
                             f"{type(exc).__name__}: {exc}{instead}") from None
    options = _here.configured
    return (options.state_file if options else None) or default_path(cfg.bind)


@contextmanager
def _guard(server: Any, hook: str) -> Iterator[None]:
    """Let refusals and raising callbacks through; log any other fault and carry on."""
    try:
        yield
    except CallbackFailed as failed:
        raise failed.error from None
    except LifecycleError as exc:
        server.log.error("gunicorn_lifecycle: %s", exc)
        if hook == "on_starting" and not isinstance(exc, StateDamaged):
            raise  # refused at start: Gunicorn does not start
        _switch_off()
    except LockTimeout as exc:
        server.log.error("gunicorn_lifecycle: %s", exc)
    except Exception:
        server.log.exception("gunicorn_lifecycle: %s failed; the server carries on", hook)


def _switch_off() -> None:
    _here.off = True
    _here.master = None
    if _here.worker is not None:
        _here.worker.heartbeat.stop()
        _here.worker = None


def _options(server: Any) -> Options:
    if _here.configured is None:
        server.log.warning("gunicorn_lifecycle: configure() was not called in the config "
                           "file; running without callbacks")
        _here.configured = Options()
    return _here.configured


def _check_wiring(server: Any) -> None:
    """Log an error for each of our hooks that is left at Gunicorn's default."""
    for name in HOOKS:
        setting = server.cfg.settings.get(name)
        if setting is not None and setting.get() is type(setting).default:
            server.log.error("gunicorn_lifecycle: the %s hook is not wired; add "
                             "`%s = gunicorn_lifecycle.%s` to the config file (or call it "
                             "from your own %s)", name, name, name, name)


def on_starting(server: Any) -> None:
    """Open the state file and a generation: start, restart or upgrade."""
    _here.starting_failed = True
    with _guard(server, "on_starting"):
        options = _options(server)
        path = _state_path(server, options)
        if options.state_file is None and path == default_path(server.cfg.bind):
            make_default_directory(os.path.dirname(path))
        state_file = open_for_server(path, options.slots)
        server.log.info("gunicorn_lifecycle: state file %s", path)
        _hand_down(server, path)
        _check_wiring(server)
        systemd = _systemd(server, options)
        master = Master(Transactions(state_file, server.log, systemd), server, server.master_pid)
        master.start(options)
        _here.master, _here.starting_failed, _here.config = master, False, server.cfg
        if systemd is not None:
            # Gunicorn's own READY=1, sent right after this hook before any worker exists,
            # goes nowhere; the socket is given back with the first message after it.
            _here.notify_socket = os.environ.pop("NOTIFY_SOCKET")


def _state_path(server: Any, options: Options) -> str:
    """The configured state file; for a USR2 master, its parent's, whatever the config says now.

    A relative ``state_file`` resolved through a release symlink that was flipped
    since (``current -> releases/r2``) names another file: the new master would
    open a new lineage beside the live one, or close a live master's generations
    in a copy of its file as crashed.
    """
    configured = options.state_file or default_path(server.cfg.bind)
    parent, _, path = os.environ.pop(_HANDED_DOWN, "").partition(":")
    if not path or parent != os.environ.get("GUNICORN_PID"):
        return configured
    if not _same_file(path, configured):
        server.log.warning("gunicorn_lifecycle: this master was started by USR2 from master %s, "
                           "and uses its state file %s; the config now gives %s (a release "
                           "flipped under a relative state_file?), which takes effect at the "
                           "next full restart", parent, path, configured)
    return path


def _same_file(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def _hand_down(server: Any, path: str) -> None:
    """Tell the master a USR2 starts which state file this one uses: in the environment
    Gunicorn gives it (that of the config, not this process's, which workers inherit), by its
    real path (no symbolic link in it can be flipped meanwhile)."""
    server.cfg.env_orig[_HANDED_DOWN] = f"{os.getpid()}:{os.path.realpath(path)}"


def _systemd(server: Any, options: Options) -> Systemd | None:
    """What tells systemd, when the plugin takes the protocol over from Gunicorn; None when
    systemd is not told (``systemd=False``, or not run by systemd)."""
    if options.systemd is False or not (os.environ.get("NOTIFY_SOCKET") or
                                        options.systemd is True):
        return None
    if not server.num_workers:  # no worker to wait for: Gunicorn's own READY=1 is right
        return None
    if not os.environ.get("NOTIFY_SOCKET"):
        server.log.error("gunicorn_lifecycle: systemd=True, but NOTIFY_SOCKET is not set: run "
                         "the server from a unit with Type=notify and NotifyAccess=all")
        return None
    watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6
    if watchdog and watchdog <= 2 * options.interval:
        server.log.warning("gunicorn_lifecycle: WatchdogSec=%gs is too short for interval=%gs: "
                           "the watchdog is fed once per interval; make it at least %gs",
                           watchdog, options.interval, 2 * options.interval + options.failed)

    def send(message: str) -> None:
        _give_back_socket()
        sd_notify(message, server.log)

    return Systemd(send, watchdog > 0)


def _give_back_socket() -> None:
    """Put systemd's socket back in the environment, once Gunicorn's early READY=1 went
    nowhere: for Gunicorn's sd_notify, and for what runs here, as without the plugin."""
    if _here.notify_socket is not None and "NOTIFY_SOCKET" not in os.environ:
        os.environ["NOTIFY_SOCKET"] = _here.notify_socket


def on_reload(server: Any) -> None:
    """HUP: open a new generation with the options of the re-read config."""
    master = _here.master
    if master is None:
        return
    if _here.notify_socket is not None:
        # Gunicorn hands a USR2 master the environment its config was read in; the config
        # this HUP re-read may have been read while the socket was held back.
        _give_back_socket()
        server.cfg.env_orig.setdefault("NOTIFY_SOCKET", _here.notify_socket)
    with _guard(server, "on_reload"):
        options = _options(server)
        if not _same_file(options.state_file or default_path(server.cfg.bind),
                          master.tx.state.path):
            server.log.warning("gunicorn_lifecycle: state_file changed on reload; it takes "
                               "effect at the next start, %s stays in use",
                               master.tx.state.path)
        _hand_down(server, master.tx.state.path)  # in the re-read config's environment
        master.reload(options)
        _here.config = server.cfg


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: register and run ``worker_start``."""
    master, _here.master = _here.master, None
    _give_back_socket()
    if master is None or not master.generations:
        if not (_here.starting_failed or _here.off):
            server.log.error("gunicorn_lifecycle: post_fork ran but on_starting did not; wire "
                             "`on_starting = gunicorn_lifecycle.on_starting`")
        return  # else on_starting logged why it opened no generation
    with _guard(server, "post_fork"):
        if _here.configured is not master.options:
            server.log.error("gunicorn_lifecycle: the config was re-read but no new generation "
                             "was opened; wire `on_reload = gunicorn_lifecycle.on_reload`")
        master.tx.after_fork()
        _here.worker = Worker(master.tx, master.current, master.options, server, worker,
                              serving=lambda: bool(getattr(worker, "alive", True)))
        _here.worker.start()


def post_worker_init(worker: Any) -> None:
    """The worker loaded the application: its warm-up, if configured, then ``worker_start``,
    then its slot marked booted. A warm-up that fails raises, so that Gunicorn fails the
    worker's boot (a new master halts, a cold start fails)."""
    if _here.worker is not None:
        _exit_through_python()
        _warm_up(worker, _here.worker.options)
        with _guard(worker, "post_worker_init"):
            _here.worker.booted()


def _warm_up(worker: Any, options: Options) -> None:
    if options.warmup is None:
        return
    from .warmup import WarmupFailed, prove  # here: only a worker with a warm-up loads it

    # Gunicorn's own ASGI worker keeps its application as `asgi`, the others as `wsgi`.
    app = getattr(worker, "asgi", None) or getattr(worker, "wsgi", None)
    try:
        prove(options.warmup, app, worker)
    except WarmupFailed as failed:
        worker.log.error("gunicorn_lifecycle: worker %s failed its %s; its boot fails",
                         worker.pid, failed)
        raise


def _exit_through_python() -> None:
    """Make the stop signals that would kill the worker outright exit through Python instead.

    UvicornWorker leaves them at SIG_DFL and uvicorn re-raises the one it caught
    after its graceful shutdown: the process would die by the signal, and
    Gunicorn's ``worker_exit`` hook (our worker's exit) would never run.
    """
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        if signal.getsignal(stop) == signal.SIG_DFL:
            signal.signal(stop, lambda signum, frame: sys.exit(0))


def worker_abort(worker: Any) -> None:
    """Gunicorn aborts the worker for overrunning its ``timeout``: its exit is a loss."""
    if _here.worker is not None:
        _here.worker.aborted = True


def worker_exit(server: Any, worker: Any) -> None:
    """The worker's own exit; in the master, a worker that vanished before it was signalled."""
    if _here.worker is not None and worker.pid == os.getpid():
        with _guard(server, "worker_exit"):
            _here.worker.exit()
    else:
        child_exit(server, worker)


def child_exit(server: Any, worker: Any) -> None:
    """The master reaped a worker: lost, if it had not deregistered."""
    master = _here.master
    if master is not None and master.generations:
        with _guard(server, "child_exit"):
            master.reaped(worker.pid, worker)


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    """TTIN/TTOU changed the master's worker count: the current generation's target.

    A HUP sets the count too, from the re-read config, before ``on_reload``: that
    count is the target of the generation it opens, not of the current one.
    """
    master = _here.master
    if master is not None and master.generations and server.cfg is _here.config:
        with _guard(server, "nworkers_changed"):
            master.follow_workers(new_value)


def on_exit(server: Any) -> None:
    """The master exits: close its generations (stop, upgrade or rollback)."""
    master = _here.master
    if master is not None and master.generations:
        with _guard(server, "on_exit"):
            master.exit()
