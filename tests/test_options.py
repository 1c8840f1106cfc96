"""configure() refuses a bad option by name, before any worker starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gunicorn_lifecycle
from gunicorn_lifecycle import LifecycleError, hooks


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


@pytest.fixture(autouse=True)
def a_fresh_config_load() -> Iterator[None]:
    """Each test is a config of its own: configure() may be called once in it."""
    hooks._here.loading = None
    yield
    hooks._here.loading = None


def test_callbacks_take_a_list_run_in_order() -> None:
    gunicorn_lifecycle.configure(worker_exit=[print, repr], master_start=(print,))
    options = hooks._here.configured
    assert options is not None
    assert options.callbacks("worker_exit") == (print, repr)
    assert options.callbacks("master_start") == (print,) and options.callbacks("worker_lost") == ()


def test_a_list_with_something_not_callable_names_the_option() -> None:
    with pytest.raises(LifecycleError, match=r"^worker_exit must be a callable"):
        gunicorn_lifecycle.configure(worker_exit=[print, "not callable"])


def test_a_second_configure_in_one_config_names_both_calls(tmp_path: Path) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("import gunicorn_lifecycle\n"
                      "gunicorn_lifecycle.configure(worker_exit=print)\n"
                      "\n"
                      "gunicorn_lifecycle.configure(worker_lost=print)\n")
    namespace = {"__name__": "__config__", "__file__": str(config)}
    with pytest.raises(LifecycleError) as error:
        exec(compile(config.read_text(), str(config), "exec"), namespace)
    assert f"{config}:2 and at {config}:4" in str(error.value)
    assert "pass a list" in str(error.value)


def test_the_config_read_again_may_configure_again(tmp_path: Path) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("import gunicorn_lifecycle\ngunicorn_lifecycle.configure(interval=1)\n")
    for _ in range(2):  # Gunicorn executes its config file again on HUP, in a new module
        exec(compile(config.read_text(), str(config), "exec"),
             {"__name__": "__config__", "__file__": str(config)})
    assert hooks._here.configured is not None and hooks._here.configured.interval == 1


def test_a_relative_state_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "gunicorn.conf.py"
    config.parent.mkdir()
    config.write_text("import gunicorn_lifecycle\n"
                      "gunicorn_lifecycle.configure(state_file='run/app.state')\n")
    exec(compile(config.read_text(), str(config), "exec"),
         {"__name__": "__config__", "__file__": str(config)})
    assert hooks._here.configured is not None
    assert hooks._here.configured.state_file == str(tmp_path / "conf" / "run" / "app.state")
