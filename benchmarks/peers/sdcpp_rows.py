"""stable-diffusion.cpp through stable-diffusion-cpp-python, run in its own venv (benchmarks/peer_venvs.py,
built here with -march=native) by benchmarks/side_by_side.py; one JSON row per weight type on stdout.

    python sdcpp_rows.py --model SINGLE_FILE.safetensors --res 256 --steps 20 --repeat 3 [--wtypes f16,q8_0]

The original-layout single file is converted at load to each weight type (f16, q8_0), all threads.
stable-diffusion.cpp has no call for one UNet evaluation, so the per-step time is taken from whole runs:
(median run of --steps steps - median run of 2 steps) / (--steps - 2); text encoding and VAE decoding,
the same in both, cancel. A step is one sampler step with CFG (two UNet evaluations of batch 1, which is how
stable-diffusion.cpp runs guidance), the same work as one CFG-batch-2 UNet call. Its sampler is Euler (one
UNet evaluation per step, like DDIM) and its noise comes from its own generator, so its images are not
compared with the others.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import peer_args, process_peak_mb, print_rows  # noqa: E402

GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"
SHORT = 2  # steps of the short run whose time is subtracted


def rows(a, say) -> list[dict]:
    from stable_diffusion_cpp import StableDiffusion

    threads = os.cpu_count() or 1
    out = []
    for wtype in a.wtypes.split(","):
        t0 = time.perf_counter()
        sd = StableDiffusion(model_path=a.model, wtype=wtype, n_threads=threads, verbose=False)
        load_s = time.perf_counter() - t0

        def run(steps):
            t = time.perf_counter()
            images = sd.generate_image(PROMPT, negative_prompt="", cfg_scale=GUIDANCE, width=a.res, height=a.res,
                                       sample_method="euler", sample_steps=steps, seed=0)
            return time.perf_counter() - t, images

        run(SHORT)  # warm-up: graph allocation, weight repacking
        short = float(np.median([run(SHORT)[0] for _ in range(max(1, a.repeat // 2))]))
        times = []
        for _ in range(max(1, a.repeat // 2)):
            dt, images = run(a.steps)
            times.append(dt)
        e2e = float(np.median(times))
        step = (e2e - short) / (a.steps - SHORT)
        out.append({"suite": "stable-diffusion.cpp", "backend": f"stable-diffusion.cpp {wtype}", "precision": wtype,
                    "unet_step_s": step, "end_to_end_s": e2e, "it_per_s": 1.0 / step, "threads": threads,
                    "peak_mem_mb": process_peak_mb(), "prepare_s": round(load_s, 1),
                    "image_size": list(images[0].size) if images else None})
        say(f"[stable-diffusion.cpp {wtype}] step {step:.3f} s, end to end {e2e:.2f} s ({a.steps} steps)")
        sd = None  # freed before the next weight type loads
    return out


def main() -> int:
    p, a = peer_args(__doc__, ("--model", {"required": True}), ("--wtypes", {"default": "f16,q8_0"}))
    if a.steps <= SHORT:
        p.error(f"--steps must be more than {SHORT}: the per-step time is a difference of runs")
    return print_rows(rows(a, lambda m: print(m, file=sys.stderr, flush=True)))

if __name__ == "__main__":
    sys.exit(main())
