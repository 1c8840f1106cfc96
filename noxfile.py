"""`make matrix`: the test suite against each supported Gunicorn on each Python here.

Interpreters are found on PATH, and in pyenv's versions folder when there is one.
"""

from __future__ import annotations

import glob
import os

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
GUNICORNS = ["21.2.0", "22.0.0", "23.0.0", "25.3.0", "27.0.1"]

pyenv = os.path.expanduser(os.environ.get("PYENV_ROOT", "~/.pyenv"))
os.environ["PATH"] = os.pathsep.join(
    [*sorted(glob.glob(f"{pyenv}/versions/3.1[0-9]*/bin")), os.environ["PATH"]])

nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True


@nox.session(python=PYTHONS)
@nox.parametrize("gunicorn", GUNICORNS)
def tests(session: nox.Session, gunicorn: str) -> None:
    session.install(".[test]", f"gunicorn=={gunicorn}")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)
