"""The heartbeat's thread primitives stay real OS threads when gevent or eventlet patched
everything before the plugin was imported (SPEC section 6)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PATCH_FIRST = {
    "gevent": "from gevent import monkey\nmonkey.patch_all()",
    "eventlet": "import eventlet\neventlet.monkey_patch()",
}
PROBE = """
import os, time
from gunicorn_lifecycle import threads

before = len(os.listdir("/proc/self/task"))
threads.start_new_thread(lambda: threads.sleep(5), ())
deadline = time.monotonic() + 5
while len(os.listdir("/proc/self/task")) == before and time.monotonic() < deadline:
    threads.sleep(0.01)
lock = threads.RLock()
print(len(os.listdir("/proc/self/task")) - before, type(lock).__module__,
      threads.sleep.__module__, threads.get_ident.__module__)
"""


@pytest.mark.parametrize("library", PATCH_FIRST)
def test_threads_are_real_after_monkey_patching(library: str) -> None:
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", PATCH_FIRST[library] + PROBE],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    new_threads, lock, sleep, ident = done.stdout.split()
    assert new_threads == "1", "one more OS thread, not a greenlet"
    assert (lock, sleep, ident) == ("_thread", "time", "_thread"), done.stdout
