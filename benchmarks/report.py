"""Output shared by the benchmark scripts: one JSON row per configuration on stdout, and the list in a file."""
from __future__ import annotations

import json
import statistics
import time


def emit(rows: list[dict], path: str | None = None, echo: bool = True) -> None:
    if echo:
        for r in rows:
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def median_time(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls of fn, after one untimed warm-up call (first-call allocations,
    lazy compilation)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PeakRSS:
    """Peak resident set (MB) of this process over a `with` block, polled every 10 ms from /proc (the
    benchmark scripts that run in a peer's own venv have no ldm_engine to import)."""

    def __init__(self):
        import threading

        self.peak_mb = 0.0
        self._done = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        import os

        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while not self._done.is_set():
            with open("/proc/self/statm") as f:
                self.peak_mb = max(self.peak_mb, int(f.read().split()[1]) * page_mb)
            self._done.wait(0.01)

    def __enter__(self):
        self._poller.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._poller.join()


def peer_args(description: str, *extra: tuple[str, dict]):
    """The arguments every peer script takes (the run's shape) plus its own; returns the parsed namespace."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in extra:
        p.add_argument(flag, **kw)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    return p, p.parse_args()


def print_rows(rows) -> int:
    """A peer script's rows, one JSON line each on stdout as they come (the parent keeps what it got if a
    later configuration crashes); its messages go to stderr."""
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0
