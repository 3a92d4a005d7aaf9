"""One local Ray instance for the whole serving test session (2 CPUs, no dashboard)."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_instance():
    """A local Ray instance shared by every test in tests/serve; yields its address."""
    from ldm_engine.serve.ray_env import init_ray

    # as ldm-serve does: workers import the installed package, not a source checkout in the current directory
    ctx = init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                   configure_logging=False)
    try:
        yield ctx.address_info["address"]
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_url(ray_instance):
    """ldm-serve's app on 127.0.0.1: the embedded model under two names ("shapes", the default, and
    "shapes-b"), batches of up to 8 images. Also mounts a strict app (auth, a queue of one) at /strict."""
    from ldm_engine.defaults import default_model
    from ldm_engine.serve.cli import app_builder, start
    from ray import serve

    weights = str(default_model())
    port = _free_port()
    url = start({"models": [{"name": "shapes", "path": weights}, {"name": "shapes-b", "path": weights}],
                 "max_batch_size": 8, "batch_wait_ms": 100, "replica_cpus": 0.25, "threads": 2}, port=port)
    serve.run(app_builder({"models": [{"name": "shapes", "path": weights}], "max_batch_size": 1,
                           "max_ongoing_requests": 1, "max_queued_requests": 1, "replica_cpus": 0.25, "threads": 2,
                           "api_key": "sk-test", "basic_auth": "user:pass"}), name="strict", route_prefix="/strict")
    yield url
    serve.delete("strict")
    serve.delete("ldm_engine")


@pytest.fixture(scope="session")
def strict_url(serve_url):
    return f"{serve_url}/strict"
