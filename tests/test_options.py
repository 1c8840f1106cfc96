"""configure() refuses a bad option by name, before any worker starts."""

from __future__ import annotations

from typing import Any

import pytest

import gunicorn_lifecycle
from gunicorn_lifecycle import LifecycleError


@pytest.mark.parametrize(("options", "names"), [
    ({"master_start": "not callable"}, "master_start"),
    ({"worker_lost": 3}, "worker_lost"),
    ({"interval": 0}, "interval"),
    ({"interval": -1.0}, "interval"),
    ({"interval": float("nan")}, "interval"),
    ({"interval": True}, "interval"),
    ({"failed": -0.1}, "failed"),
    ({"lock_timeout": 0}, "lock_timeout"),
    ({"lock_timeout": "30"}, "lock_timeout"),
    ({"on_error": "ignore"}, "on_error"),
    ({"slots": 0}, "slots"),
    ({"state_file": 42}, "state_file"),
    ({"state_file": ""}, "state_file"),
])
def test_bad_options_name_the_option(options: dict[str, Any], names: str) -> None:
    with pytest.raises(LifecycleError, match=f"^{names} must be"):
        gunicorn_lifecycle.configure(**options)


def test_good_options_are_accepted() -> None:
    gunicorn_lifecycle.configure(master_start=print, interval=0.01, failed=0, on_error="raise",
                                 lock_timeout=0.5, slots=1, state_file="relative.state")
