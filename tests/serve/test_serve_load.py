"""64 requests at once against one replica: every one answered with its own seed's solo image, and the
batched throughput reported against the same requests sent one at a time (benchmarks/serve_load.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute and a half of generation


def test_64_concurrent_requests_all_served_with_their_own_images(serve_url):
    path = Path(__file__).parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    out = load.run_load(serve_url, 64, 20)
    print(f"\n{out['cpu']}: one at a time {out['sequential_ips']:.2f} images/s, 64 at once "
          f"{out['concurrent_ips']:.2f} images/s (mean batch {out['mean_batch']:.1f}): {out['speedup']:.2f}x")
    assert out["mismatched"] == []
    assert out["mean_batch"] > 1.0
