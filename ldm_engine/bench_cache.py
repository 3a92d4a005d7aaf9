"""`ldm-bench --cache-interval N`: what the DeepCache step cache (ldm_engine.optimize.step_cache) gives on
each backend. After a configuration's plain runs the same runs are timed again with the cache
(branch 0, uniform schedule):
    cache_full_step_s     median full step (the whole UNet, keeping the deep feature)
    cache_shallow_step_s  median shallow step (the shallow part on the kept feature)
    cache_end_to_end_s    median run with the cache
    cache_speedup_x       end_to_end_s / cache_end_to_end_s
    cache_psnr_db         the cached image against the same backend's uncached one
"""
from __future__ import annotations

import statistics

CACHE_FIELDS = ("cache_full_step_s", "cache_shallow_step_s", "cache_end_to_end_s", "cache_speedup_x", "cache_psnr_db")


def cache_row(pipe, run, interval: int, steps: int, warmup: int, repeat: int, plain_e2e: float, plain_image,
              device: str, progress) -> dict:
    """The CACHE_FIELDS of one configuration (None each where its backend has no step cache).
    `run(n_steps, **call_kwargs)` runs the pipeline and returns its output."""
    import time

    from .bench import CallTimer, _sync, psnr
    from .optimize.step_cache import full_steps

    if not hasattr(pipe.backend, "denoise_cached"):
        progress(f"[{pipe.backend.name}] step cache skipped: this backend has none")
        return dict.fromkeys(CACHE_FIELDS)
    timer = CallTimer(pipe.backend, ("denoise_cached",), device)
    for _ in range(warmup):  # a full and a shallow step: compiles both graphs
        run(min(steps, 2), cache_interval=interval)
    full = set(full_steps(steps, interval))
    full_t, shallow_t, e2e = [], [], []
    for i in range(repeat):
        timer.reset()
        _sync(device)
        t0 = time.perf_counter()
        out = run(None, cache_interval=interval)
        _sync(device)
        e2e.append(time.perf_counter() - t0)
        calls = timer.durations("denoise_cached")  # one call per step for the samplers ldm-bench runs
        full_t += [d for k, d in enumerate(calls) if k in full]
        shallow_t += [d for k, d in enumerate(calls) if k not in full]
        progress(f"[{pipe.backend.name}] cached run {i + 1}/{repeat}: {e2e[-1]:.2f} s")
    cached = statistics.median(e2e)
    return {"cache_full_step_s": statistics.median(full_t),
            "cache_shallow_step_s": statistics.median(shallow_t) if shallow_t else None,
            "cache_end_to_end_s": cached, "cache_speedup_x": plain_e2e / cached,
            "cache_psnr_db": psnr(plain_image, out.images)}
