"""The exceptions users see."""


class LifecycleError(RuntimeError):
    """A bad option, an unusable state file, or a state shared with a foreign master.

    It subclasses ``RuntimeError`` so that Gunicorn, which catches that around
    its arbiter, prints the message and exits non-zero instead of a traceback.
    """


class StateDamaged(LifecycleError):
    """The state file changed under a running server (truncated, grown, overwritten).

    The lifecycle turns off in the process that found it, which goes on serving.
    """
