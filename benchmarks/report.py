"""Output shared by the benchmark scripts: one JSON row per configuration on stdout, and the list in a file."""
from __future__ import annotations

import json


def emit(rows: list[dict], path: str | None = None, echo: bool = True) -> None:
    if echo:
        for r in rows:
            print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
