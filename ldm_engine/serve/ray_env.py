"""Joining or starting Ray so that its workers import the installed ldm_engine.

Ray puts the driver's current directory at the front of every worker's sys.path unless the job has a
runtime_env working_dir. Started from a source checkout of ldm_engine, workers would then import the
source folder — which lacks the compiled `_C` and the `export` / `kernels` packages the wheel places
inside — instead of the installed package. An empty working_dir keeps the workers on the installed one.
"""
from __future__ import annotations

import tempfile

_EMPTY_DIR: str | None = None


def runtime_env() -> dict:
    """The runtime_env every ldm_engine job runs with: an empty working_dir (see above)."""
    global _EMPTY_DIR
    if _EMPTY_DIR is None:
        _EMPTY_DIR = tempfile.mkdtemp(prefix="ldm_engine_ray_")
    return {"working_dir": _EMPTY_DIR}


def init_ray(address: str | None = None, **options):
    """ray.init with ldm_engine's runtime_env; returns what ray.init returns."""
    import ray

    return ray.init(address=address, runtime_env=runtime_env(), **options)
