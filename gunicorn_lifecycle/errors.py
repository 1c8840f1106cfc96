"""The one exception users see."""


class LifecycleError(RuntimeError):
    """A bad option, an unusable state file, or a state shared with a foreign master.

    It subclasses ``RuntimeError`` so that Gunicorn, which catches that around
    its arbiter, prints the message and exits non-zero instead of a traceback.
    """
