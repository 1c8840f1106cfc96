from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Make Gunicorn instances in this test's directory; all are killed at teardown."""
    made: list[Server] = []

    def make(**kwargs: Any) -> Server:
        instance = Server(tmp_path / f"instance{len(made)}", **kwargs)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.kill_all()
