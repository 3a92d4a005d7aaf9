"""ldm-serve under load: N requests at once against one replica, against the same N sent one at a time.

    python benchmarks/serve_load.py [--requests 64] [--steps 20] [--max-batch-size 8] [--url URL]

Without --url it starts a local Ray instance and the app (the embedded model, one replica, all cores).
Each request is an A1111 txt2img of one image with its own seed. It first sends them one after another
(each served alone), then all at once from a thread pool (Ray Serve batches them), and checks that
every request of the concurrent run succeeded with its own seed and the very pixels its solo run gave
(none lost, none duplicated, batching invisible in the images). Prints images/s for both and the ratio.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def one(url: str, body: dict, seed: int) -> tuple[int, str]:
    """(the seed the server used, a digest of the image's pixels: PNG bytes minus nothing else varying)."""
    from io import BytesIO

    from PIL import Image

    r = requests.post(f"{url}/sdapi/v1/txt2img", json=dict(body, seed=seed), timeout=600)
    r.raise_for_status()
    answer = r.json()
    pixels = Image.open(BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB").tobytes()
    return json.loads(answer["info"])["seed"], hashlib.sha256(pixels).hexdigest()


def batch_totals(url: str) -> tuple[float, float]:
    """(images, batches) run so far, from the server's Prometheus metrics."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    value = {k: float(line.split()[-1]) for line in text.splitlines()
             for k in ("ldm_batch_images_sum", "ldm_batch_images_count") if line.startswith(k)}
    return value.get("ldm_batch_images_sum", 0.0), value.get("ldm_batch_images_count", 0.0)


def run_load(url: str, n: int, steps: int, size: int = 64) -> dict:
    body = {"prompt": "a red circle on a blue background", "steps": steps, "width": size, "height": size,
            "sampler_name": "DDIM", "cfg_scale": 4.0}
    seeds = list(range(1000, 1000 + n))
    one(url, body, 1)  # warm-up
    start = time.perf_counter()
    solo = [one(url, body, s) for s in seeds]
    sequential_s = time.perf_counter() - start
    before = batch_totals(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        together = list(pool.map(lambda s: one(url, body, s), seeds))
    concurrent_s = time.perf_counter() - start
    mismatched = [s for s, a, b in zip(seeds, solo, together) if a != b or a[0] != s]
    after = batch_totals(url)
    images, batches = after[0] - before[0], after[1] - before[1]
    return {"requests": n, "steps": steps, "size": size, "sequential_s": sequential_s, "concurrent_s": concurrent_s,
            "sequential_ips": n / sequential_s, "concurrent_ips": n / concurrent_s,
            "speedup": sequential_s / concurrent_s, "mismatched": mismatched,
            "mean_batch": images / max(batches, 1),
            "cpu": cpu_model()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--url", help="a running ldm-serve (default: start one here)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    url = args.url
    if url is None:
        from ldm_engine.serve.cli import start

        url = start({"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                     "max_ongoing_requests": max(16, args.requests), "max_queued_requests": 2 * args.requests},
                    port=7861)
    out = run_load(url, args.requests, args.steps)
    if args.json:
        print(json.dumps(out))
        return
    print(f"CPU: {out['cpu']}; {out['requests']} txt2img requests of one {out['size']}x{out['size']} image, "
          f"{out['steps']} DDIM steps, embedded model, 1 replica, max_batch_size {args.max_batch_size}")
    print("| run | seconds | images/s |\n|---|---|---|")
    print(f"| one at a time | {out['sequential_s']:.1f} | {out['sequential_ips']:.2f} |")
    print(f"| {out['requests']} at once (mean batch {out['mean_batch']:.1f} images) | {out['concurrent_s']:.1f} | "
          f"{out['concurrent_ips']:.2f} |")
    print(f"batched / one at a time: {out['speedup']:.2f}x; requests whose image differs from its solo run: "
          f"{len(out['mismatched'])}")


if __name__ == "__main__":
    main()
