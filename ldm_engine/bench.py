"""`ldm-bench`: time txt2img per stage on each backend, against GEMM rooflines measured at the start.

    ldm-bench --steps 50 --res 512 [--backend all|torch|onnxruntime|openvino|tensorrt|A,B]
              [--dtype auto|fp32|bf16|fp16] [--batch N] [--model PATH | --arch sd-1.5]
              [--warmup N --repeat N] [--quick] [--parity] [--controlnet] [--json FILE]

--backend all (the default) runs every backend usable on this device and says why each other one is
skipped; a backend named explicitly that cannot run here stops the command before any work (exit 2).
--dtype auto runs each backend in fp32 and in its reduced precision (bf16 only on CPUs with bf16
instructions: elsewhere it is emulated and far slower). --quick: one configuration per backend in its
default precision, at 256x256 with 4 steps unless --res / --steps are given.

Every configuration runs the real Pipeline end to end (--warmup runs of 2 steps first: compiles and
caches, then --repeat timed runs) under a progress bar; the backend's calls are timed from outside, so
one run yields
    text_encoder_s      the text encoder call (prompts and negatives in one batch)
    unet_step_s         median UNet call (the CFG batch, 2 x --batch)
    sampler_overhead_s  per step, the loop's time between UNet calls (guidance, update, bookkeeping)
    vae_decode_s        the VAE decoder call
    end_to_end_s        the whole pipeline call, median over --repeat
    unet_gflop_per_s    the UNet's FLOPs (counted once on the meta device) / unet_step_s, and
    roofline_pct        that as a percentage of a large GEMM's GFLOP/s in the same dtype on this machine.
Every row also records the machine (ldm_engine/bench_machine.py): cpu, isa (the bf16/int8/AVX
extensions present), int8_gemm_gflops with int8_gemm_by (the fastest native int8 GEMM found, null with
the reason said once where none runs) and cache_interval (the step-feature cache's interval; null:
no cache). --controlnet adds each configuration's step with a random ControlNet of the architecture
(ldm_engine/bench_control.py: controlnet_s, control_unet_step_s, control_step_s, control_cost_x).
Without --model the architecture (default sd-1.5) gets random weights: timings do not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .bench_backends import configs_for
from .bench_machine import cpu_name, gemm_roofline, has_native_bf16, int8_gemm_roofline, isa_flags
from .bench_progress import StepProgress, config_steps, print_plan, say, table
from .export.graphs import DTYPE_NAMES, DTYPES

PROMPT = "a photograph of an astronaut riding a horse"


# ---- measurements --------------------------------------------------------------------------------

def unet_gflop(config, batch: int, res: int) -> float:
    """FLOPs (as GFLOP) of one UNet call on the CFG batch at this resolution, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import UNetModel

    f = config.vae.downsampling_factor
    with torch.device("meta"):
        unet = UNetModel(config.unet)
        x = torch.zeros(2 * batch, config.unet.in_channels, res // f, res // f)
        t = torch.zeros(2 * batch)
        ctx = torch.zeros(2 * batch, 77, config.unet.context_dim) if config.unet.context_dim else None
        labels = torch.zeros(2 * batch, dtype=torch.long) if config.unet.num_classes is not None else None
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, t, ctx, class_labels=labels)
    return counter.get_total_flops() / 1e9


class PeakMemory:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 10 ms; on CUDA
    the peak of torch's allocator."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            self._stop.wait(0.01)

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() / 2**20


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class CallTimer:
    """Wraps a backend's methods in place; records (start, end) of every call."""

    def __init__(self, backend, names=("encode_text", "denoise", "decode"), device: str = "cpu"):
        self.calls: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for name in names:
            setattr(backend, name, self._wrap(name, getattr(backend, name), device))

    def _wrap(self, name, fn, device):
        def timed(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            self.calls[name].append((t0, time.perf_counter()))
            return out

        return timed

    def reset(self):
        for v in self.calls.values():
            v.clear()

    def durations(self, name) -> list[float]:
        return [b - a for a, b in self.calls[name]]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1]; inf when identical."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---- one configuration ---------------------------------------------------------------------------

def copy_modules(model):
    """The same LoadedModel with its own copies of the nn.Modules (the tokenizer is shared)."""
    import dataclasses

    return dataclasses.replace(model, **{name: copy.deepcopy(getattr(model, name))
                                         for name in ("unet", "vae", "text_encoder", "class_embedder")})


def make_pipeline(model, backend: str, dtype: str, device: str, **options):
    """A Pipeline on `backend`. The torch backend casts modules in place, so a reduced-precision torch
    run gets its own copy and the shared fp32 model (the source of every export) stays fp32."""
    from .pipeline import Pipeline

    torch_dtype = None if dtype == "auto" else "int8" if dtype == "int8" else DTYPES[dtype]
    if backend == "torch":
        torch_dtype = torch_dtype or torch.float32
        m = model if torch_dtype == torch.float32 and device == "cpu" else copy_modules(model)
        return Pipeline(m, "torch", device, torch_dtype, **options)
    return Pipeline(model, backend, device, torch_dtype, **options)


def bench_config(model, backend: str, dtype: str, res: int, batch: int, steps: int, warmup: int, repeat: int,
                 device: str, gflop: float, rooflines: dict, guidance: float = 7.5, progress=print,
                 controlnet: Path | None = None, steps_progress: StepProgress | None = None,
                 cache_interval: int | None = None) -> tuple[dict, np.ndarray]:
    """Time one (backend, dtype); returns its row and the last image (for parity). `controlnet`: a
    ControlNet file whose step is timed after the plain runs (bench_control.control_row); `cache_interval`
    times the plain runs again with the step cache (bench_cache.cache_row). `rooflines`
    ({dtype name: GFLOP/s}) gains the backend's actual dtype if it lacks it. `steps_progress` draws a
    bar over this configuration's denoising steps."""
    pipe = make_pipeline(model, backend, dtype, device)
    actual = getattr(pipe.backend, "dtype", None)
    dtype_name = DTYPE_NAMES.get(actual, dtype)
    if dtype_name not in rooflines and dtype_name in DTYPES:
        rooflines[dtype_name] = gemm_roofline(DTYPES[dtype_name], device)
        progress(f"GEMM roofline {dtype_name}: {rooflines[dtype_name]:.0f} GFLOP/s")
    control = controlnet is not None and hasattr(pipe.backend, "controlnet")
    timer = CallTimer(pipe.backend, ("encode_text", "denoise", "decode") + (("controlnet",) if control else ()), device)
    prompts = [PROMPT] * batch if model.text_encoder is not None else None
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, seed=0, height=res, width=res,
                  output_type="np", progress=False)
    if prompts is None:
        kwargs.pop("guidance_scale")
    # a per-step callback would take a CUDA-graph loop off its graph: such runs advance the bar per run
    per_step = steps_progress is not None and not (device.startswith("cuda")
                                                   and getattr(pipe.backend, "graph_capturable", False))
    if per_step:
        kwargs["progress_callback"] = steps_progress.step
    if backend != "torch":
        progress(f"[{backend} {dtype_name}] the first run exports and compiles the graphs not yet cached")
    if steps_progress is not None:
        if controlnet is not None and not control:  # the plan counted ControlNet runs this backend cannot make
            steps_progress.total -= config_steps(steps, warmup, repeat)
        cached = cache_interval is not None and hasattr(pipe.backend, "denoise_cached")
        if cache_interval is not None and not cached:
            steps_progress.total -= config_steps(steps, warmup, repeat)
        steps_progress.bar(f"{backend} {dtype_name}", config_steps(steps, warmup, repeat, control, cached))

    def run(n_steps, **extra):
        args = [prompts] if prompts is not None else []
        t_run = time.perf_counter()
        out = pipe(*args, **{**kwargs, "num_inference_steps": n_steps or steps, **extra})
        if steps_progress is not None and not per_step:
            steps_progress.advance(n_steps or steps)
            steps_progress.run_ended((time.perf_counter() - t_run) / (n_steps or steps))
        return out

    for _ in range(warmup):
        if steps_progress is not None:
            steps_progress.run_started(timed=False)
        run(min(steps, 2))
    e2e, text_t, unet_t, overhead, decode_t = [], [], [], [], []
    with PeakMemory(device) as mem:
        for i in range(repeat):
            timer.reset()
            if steps_progress is not None:
                steps_progress.run_started(timed=True)
            _sync(device)
            t0 = time.perf_counter()
            out = run(steps)
            _sync(device)
            e2e.append(time.perf_counter() - t0)
            denoise = timer.calls["denoise"]
            unet_t.extend(b - a for a, b in denoise)
            span = denoise[-1][1] - denoise[0][0]
            between = span - sum(b - a for a, b in denoise)
            overhead.append(between / max(1, len(denoise) - 1))
            text_t.extend(timer.durations("encode_text"))
            decode_t.extend(timer.durations("decode"))
            progress(f"[{backend} {dtype_name}] run {i + 1}/{repeat}: {e2e[-1]:.2f} s")
    unet_step = statistics.median(unet_t)
    per_step_overhead = statistics.median(overhead)
    achieved = gflop / unet_step
    roof = rooflines.get(dtype_name) or rooflines["fp32"]
    row = {"backend": backend, "dtype": dtype_name, "device": device,
           "text_encoder_s": statistics.median(text_t) if text_t else None, "unet_step_s": unet_step,
           "sampler_overhead_s": per_step_overhead,
           "vae_decode_s": statistics.median(decode_t), "end_to_end_s": statistics.median(e2e),
           "it_per_s": 1.0 / (unet_step + per_step_overhead), "peak_mem_mb": round(mem.peak, 1),
           "unet_gflop": round(gflop, 2), "unet_gflop_per_s": achieved, "roofline_gflop_per_s": roof,
           "roofline_pct": 100.0 * achieved / roof}
    if cache_interval is not None:
        from .bench_cache import cache_row

        row |= cache_row(pipe, run, cache_interval, steps, warmup, repeat, row["end_to_end_s"], out.images, device,
                         progress)
    if controlnet is not None:
        from .bench_control import CONTROL_FIELDS, control_row

        row |= (control_row(pipe, timer, run, controlnet, res, warmup, repeat, unet_step, progress) if control
                else dict.fromkeys(CONTROL_FIELDS))
    if steps_progress is not None:
        steps_progress.close()
    return row, out.images


def _jsonable(row: dict) -> dict:
    """Floats rounded; an infinite PSNR (bit-identical images) becomes null, which JSON can carry."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()}


# ---- command line --------------------------------------------------------------------------------

QUICK_RES, QUICK_STEPS = 256, 4


BENCH_DTYPES = (*DTYPES, "int8")


def _dtypes(text: str) -> str:
    """--dtype: auto, or a comma list of BENCH_DTYPES."""
    if text != "auto" and any(d not in BENCH_DTYPES for d in text.split(",")):
        raise argparse.ArgumentTypeError(f"choose auto or a comma list of {', '.join(BENCH_DTYPES)}, got {text!r}")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ldm-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help=f"denoising steps per timed run (default 50; {QUICK_STEPS} with --quick)")
    p.add_argument("--res", type=int, help=f"image height and width in pixels (default 512; {QUICK_RES} with --quick)")
    p.add_argument("--backend", default="all",
                   help="torch, onnxruntime, openvino, tensorrt, a comma list, or all: every one usable here")
    p.add_argument("--dtype", default="auto", type=_dtypes,
                   help="auto: each backend in fp32 and in its reduced precision where this machine runs it natively; "
                        f"or one or more (comma-separated) of {', '.join(BENCH_DTYPES)}; int8: OpenVINO with "
                        "NNCF-quantized graphs (the int8 extra)")
    p.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees 2x with guidance)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="checkpoint file or diffusers folder")
    src.add_argument("--arch", default=None, help="preset with random weights (default sd-1.5)")
    p.add_argument("--config", help="with --model: preset name or YAML (default: detect)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1, help="untimed 2-step runs first (compiles, caches)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs; medians are reported")
    p.add_argument("--quick", action="store_true",
                   help=f"one configuration per backend in its default precision, {QUICK_RES}x{QUICK_RES} and "
                        f"{QUICK_STEPS} steps unless --res / --steps are given: a first check of each backend")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--parity", action="store_true", help="add each configuration's PSNR against torch fp32")
    p.add_argument("--controlnet", action="store_true",
                   help="also time each step with a random ControlNet of the architecture")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="also time each configuration with the DeepCache step cache (the whole UNet every N-th step)")
    p.add_argument("--json", type=Path, help="write the list of rows here")
    a = p.parse_args(argv)
    a.steps = (QUICK_STEPS if a.quick else 50) if a.steps is None else a.steps
    a.res = (QUICK_RES if a.quick else 512) if a.res is None else a.res
    if a.steps < 1 or a.repeat < 1 or a.batch < 1 or a.warmup < 0:
        p.error("--steps, --repeat and --batch must be >= 1 and --warmup >= 0")
    if a.cache_interval is not None and a.cache_interval < 1:
        p.error("--cache-interval must be >= 1")

    from .loading import CheckpointError, load_checkpoint, random_model

    isa = isa_flags()
    try:  # what runs is settled before anything is loaded: a backend that cannot run here fails at once
        configs, skipped = [], []
        for dtype in a.dtype.split(","):  # e.g. fp32,int8: both precisions in one run, ratios comparable
            more, why = configs_for(a.backend, dtype, a.device, a.quick, has_native_bf16(isa))
            configs += [c for c in more if c not in configs]
            skipped += [w for w in why if w not in skipped]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reference_only = a.parity and ("torch", "fp32") not in configs  # run for its image, not reported
    if reference_only:
        configs = [("torch", "fp32")] + configs
    steps_progress = StepProgress(print_plan(configs, a.steps, a.warmup, a.repeat, a.controlnet, skipped,
                                             a.cache_interval is not None))
    arch = a.arch or "sd-1.5"
    say(f"loading {a.model}" if a.model else f"building {arch} with random weights")
    try:
        if a.model:
            model, random_weights = load_checkpoint(a.model, config=a.config), False
            arch = model.config.name
        else:
            model, random_weights = random_model(arch), True
        from .export.graphs import pixel_multiple

        m = pixel_multiple(model)
        if a.res % m:
            raise ValueError(f"--res must be a multiple of {m} for this model, got {a.res}")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = {"cpu": cpu_name(), "isa": isa}
    say(f"{arch}: {'random weights (timings do not depend on weight values)' if random_weights else model.source}; "
        f"{a.res}x{a.res}, batch {a.batch}, {a.steps} steps, {torch.get_num_threads()} threads on {machine['cpu']} "
        f"({isa or 'no AVX2 or newer'})")
    rooflines = {"fp32": gemm_roofline(torch.float32, a.device)}  # other dtypes when a configuration runs them
    int8_rate, int8_by = int8_gemm_roofline(a.device)
    if int8_rate:
        rooflines["int8"] = int8_rate  # an int8 row's roofline_pct is against the int8 GEMM
    machine |= {"int8_gemm_gflops": int8_rate, "int8_gemm_by": int8_by if int8_rate else None,
                "cache_interval": a.cache_interval}
    say(f"GEMM roofline: fp32 {rooflines['fp32']:.0f} GFLOP/s, int8 "
        + (f"{int8_rate:.0f} GOP/s ({int8_by})" if int8_rate else f"none measured ({int8_by})"))
    gflop = unet_gflop(model.config, a.batch, a.res)
    control_dir = controlnet = None
    if a.controlnet:
        import tempfile

        from .bench_control import random_controlnet_file

        control_dir = tempfile.TemporaryDirectory(prefix="ldm-bench-controlnet-")
        try:
            controlnet = random_controlnet_file(model, Path(control_dir.name))
        except ValueError as e:
            print(f"error: --controlnet: {e}", file=sys.stderr)
            return 2
    base = {"arch": arch, "res": a.res, "batch": a.batch, "steps": a.steps, "random_weights": random_weights}
    rows = []
    reference = None
    for backend, dtype in configs:
        try:
            row, img = bench_config(model, backend, dtype, a.res, a.batch, a.steps, a.warmup, a.repeat, a.device,
                                    gflop, rooflines, a.guidance, say, controlnet, steps_progress, a.cache_interval)
        except (RuntimeError, ValueError) as e:
            say(f"[{backend} {dtype}] skipped: {e}")
            continue
        gc.collect()  # frees the finished configuration's pipeline (its call timers form a reference cycle)
        if backend == "torch" and dtype == "fp32":
            reference = img
            if reference_only:
                reference_only = False
                continue
        row = {**base, **row}
        if a.parity:
            row["psnr_db"] = psnr(reference, img) if reference is not None else None
        row |= machine
        rows.append(row)
        print(json.dumps(_jsonable(row)), flush=True)
    steps_progress.close()  # a configuration that failed left its bar open
    if rows:
        say(table(rows))
    if a.json:
        a.json.write_text(json.dumps([_jsonable(r) for r in rows], indent=1))
    if control_dir is not None:
        control_dir.cleanup()
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
