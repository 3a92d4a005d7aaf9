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


def process_peak_mb() -> float:
    """Peak resident memory (MB) of this process so far: loading, compiling and running, what the machine
    must have for the configuration (each configuration runs in a process of its own). Stdlib only: the
    scripts that run in a peer's own venv have no ldm_engine to import."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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
