"""The load generator of the throughput benchmark: its own process, so Gunicorn's CPU is its own.

Several threads send ``GET /`` over the unix socket, one connection per request
as Gunicorn's sync worker closes each; requests that complete in the measured
window (after a warm-up) are counted. Prints one JSON object.

    python -m benchmarks.load SOCKET --seconds 5 --threads 4 [--cpu 0]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time


class Counter:
    """Completed and failed requests inside the window, across all threads."""

    def __init__(self, begin: float, end: float) -> None:
        self.begin = begin
        self.end = end
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()

    def drive(self, path: str) -> None:
        done = failed = 0
        while (now := time.monotonic()) < self.end:
            ok = request(path)
            if time.monotonic() <= self.end and now >= self.begin:
                done += ok
                failed += not ok
        with self._lock:
            self.done += done
            self.failed += failed


def request(path: str) -> bool:
    """One request on a fresh connection; True for a complete 200 response."""
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(path)
            client.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
    except OSError:
        return False
    response = b"".join(chunks)
    return response.startswith(b"HTTP/1.") and response[9:12] == b"200"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    parser.add_argument("socket", help="Gunicorn's unix socket")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window")
    parser.add_argument("--begin", type=float, default=None,
                        help="time.monotonic() at which the window opens (the clock is "
                             "system-wide, so generators run together measure the same window)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured lead-in, without --begin")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--cpu", type=int, action="append", help="run on this CPU only")
    args = parser.parse_args(argv)
    if args.cpu:
        os.sched_setaffinity(0, args.cpu)
    begin = time.monotonic() + args.warmup if args.begin is None else args.begin
    if time.monotonic() >= begin:
        parser.exit(2, "the window opened before this generator was ready; give more lead\n")
    counter = Counter(begin, begin + args.seconds)
    threads = [threading.Thread(target=counter.drive, args=(args.socket,))
               for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"requests": counter.done, "failed": counter.failed,
                      "seconds": args.seconds}))


if __name__ == "__main__":
    main()
