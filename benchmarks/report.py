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
