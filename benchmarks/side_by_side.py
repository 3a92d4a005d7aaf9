"""ldm_engine next to what a user would otherwise run on a CPU, in one run on one machine, on the same
random-weight model (timings do not depend on weight values).

    python benchmarks/side_by_side.py [--arch sd-1.5] [--res 256] [--steps 20] [--repeat 3]
                                      [--skip SUITE ...] [--json FILE]

The model is written once (benchmarks/peer_fixtures.py) as a diffusers folder and as an original-layout
single file; every suite reads those, so rows that start from the same latents compare by PSNR.
Suites, each configuration in a process of its own, one after another (memory comes back between them, and no runtime's
process-wide state leaks into a peer's numbers):
  ldm_engine            the real Pipeline on torch, ONNX Runtime, OpenVINO (its default precision, f32 where
                        that differs) and OpenVINO int8, timed per stage as ldm-bench does
  direct                ldm_engine's own ONNX UNet loaded the plain way (OpenVINO compile_model with only a
                        precision hint, an ONNX Runtime session with default options)
  diffusers             StableDiffusionPipeline eager fp32, eager bf16, and its UNet through torch.compile
                        (inductor) in bf16 — bf16 only where the CPU has native bf16, else the compiled row
                        runs fp32 and the bf16 row is skipped with that reason
  optimum-intel         OVStableDiffusionPipeline, its default precision and int8 "hybrid" quantization
                        (benchmarks/peers/optimum_intel_rows.py, in a venv of its own)
  stable-diffusion.cpp  stable-diffusion-cpp-python on the single file, f16 and q8_0, all threads
                        (benchmarks/peers/sdcpp_rows.py, in a venv of its own, built for this CPU)
Peers with pins of their own get a virtual environment the script creates and reuses
(benchmarks/peer_venvs.py). A suite that cannot be installed or run leaves a row saying why.

Columns: UNet step (one CFG-batch-2 evaluation), end to end (DDIM, --steps steps, text encoder and VAE
included), it/s (1 / UNet step, what a progress bar shows), peak resident memory of the configuration's
process (loading, compiling and running; exports and quantization happen once, beforehand: ldm_engine's
in its artifact cache, optimum-intel's in a process of its own), PSNR against ldm_engine's torch fp32
image where the peer takes the same latents, and each row's step time over ldm_engine's best exact one.
The header and every row carry the CPU model and its ISA flags: compare figures within one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from report import emit, median_time, process_peak_mb

GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"
SUITES = ("ldm_engine", "direct", "diffusers", "optimum-intel", "stable-diffusion.cpp")
PEER_SCRIPTS = {"optimum-intel": "optimum_intel_rows.py", "stable-diffusion.cpp": "sdcpp_rows.py"}
PEER_VENVS = {"optimum-intel": "optimum-intel", "stable-diffusion.cpp": "stable-diffusion-cpp"}
# a peer script's configurations, each run in a process of its own (peak memory its own)
PEER_CONFIGS = {"optimum-intel": ("--configs", ("default", "int8-hybrid")),
                "stable-diffusion.cpp": ("--wtypes", ("f16", "q8_0"))}


# ---- diffusers on the same weights -----------------------------------------------------------------

def diffusers_rows(folder: Path, res: int, steps: int, repeat: int, dtype, name: str, compiled: bool,
                   work: Path) -> dict:
    """diffusers' StableDiffusionPipeline read from the fixture folder: UNet step median on the CFG batch
    and a full txt2img run from the latents seed 0 gives (the image is kept for PSNR). `compiled`:
    the UNet through torch.compile (inductor), compiled during the untimed warm-up calls."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    compile_s = 0.0
    if compiled:
        pipe.unet = torch.compile(pipe.unet)
    h = res // pipe.vae_scale_factor
    x = torch.randn(2, pipe.unet.config.in_channels, h, h, dtype=dtype)
    ctx = torch.randn(2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, dtype=dtype)
    t = torch.full((2,), 500)
    with torch.no_grad():
        if compiled:
            t0 = time.perf_counter()
            pipe.unet(x, t, encoder_hidden_states=ctx)
            compile_s = time.perf_counter() - t0
        step = median_time(lambda: pipe.unet(x, t, encoder_hidden_states=ctx), repeat)
    latents = torch.randn((1, pipe.unet.config.in_channels, h, h), generator=torch.Generator().manual_seed(0))

    def txt2img():
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=res, width=res,
                    latents=latents.to(dtype), output_type="np").images

    txt2img()
    times = []
    for _ in range(max(1, repeat // 2)):
        t0 = time.perf_counter()
        image = txt2img()
        times.append(time.perf_counter() - t0)
    image_file = work / f"image-diffusers-{name.replace(' ', '-')}-{res}.npy"
    np.save(image_file, np.asarray(image[0], np.float32))
    e2e = statistics.median(times)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return {"suite": "diffusers", "backend": f"diffusers {name}", "precision": precision,
            "unet_step_s": step, "end_to_end_s": e2e, "it_per_s": 1.0 / step,
            "peak_mem_mb": process_peak_mb(),
            "prepare_s": round(compile_s, 1) if compiled else None, "image": str(image_file)}


# ---- the same ONNX graph, loaded the plain way ----------------------------------------------------

def direct_rows(model, res: int, repeat: int) -> list[dict]:
    from ldm_engine.export.artifacts import onnx_artifact

    path = str(onnx_artifact(model, "unet"))
    h = res // model.config.vae.downsampling_factor
    tokens = model.text_encoder.config.max_length
    feeds = {"sample": np.random.randn(2, model.config.unet.in_channels, h, h).astype(np.float32),
             "timestep": np.full((2,), 500.0, np.float32),
             "context": np.random.randn(2, tokens, model.config.unet.context_dim).astype(np.float32)}
    import openvino as ov

    def openvino_row(precision: str) -> dict:
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        actual = compiled.get_property("INFERENCE_PRECISION_HINT")
        return {"suite": "direct", "backend": f"openvino hint {precision}", "precision": actual.to_string(),
                "unet_step_s": median_time(lambda: request.infer(feeds), repeat)}

    rows = [openvino_row(p) for p in ("bf16", "f32")]
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rows.append({"suite": "direct", "backend": "onnxruntime", "precision": "f32",
                 "unet_step_s": median_time(lambda: session.run(None, feeds), repeat)})
    return rows


def own_configs(suite: str, native_bf16: bool) -> list[str]:
    """The configurations of a suite of this environment; each runs in a process of its own so that its
    peak memory is its own (ru_maxrss and RSS never come down after an earlier configuration)."""
    if suite == "ldm_engine":
        configs = ["torch:fp32", "onnxruntime:fp32", "openvino:auto", "openvino:int8"]
        if native_bf16:  # else bf16 is emulated (slow, no peer runs it) and OpenVINO's default is already f32
            configs[3:3] = ["openvino:fp32", "torch:bf16"]
        return configs
    if suite == "diffusers":
        return ["eager fp32", "eager bf16", f"torch.compile {'bf16' if native_bf16 else 'fp32'}"]
    return ["all"]  # direct: UNet calls only, no memory column


def ldm_engine_row(model, config: str, a, work: Path, say) -> dict:
    """The Pipeline on one backend and precision, timed by ldm-bench's bench_config; the image kept for PSNR."""
    from ldm_engine.bench import bench_config, gemm_roofline, unet_gflop

    backend, dtype = config.split(":")
    rooflines = {"fp32": gemm_roofline(torch.float32)}
    row, img = bench_config(model, backend, dtype, a.res, 1, a.steps, 1, max(1, a.repeat // 2), "cpu",
                            unet_gflop(model.config, 1, a.res), rooflines, GUIDANCE, say)
    image_file = work / f"image-ldm_engine-{backend}-{row['dtype']}-{a.res}.npy"
    np.save(image_file, np.asarray(img[0], np.float32))
    return {"suite": "ldm_engine", **row, "backend": f"ldm_engine {backend}", "precision": row["dtype"],
            "image": str(image_file), "reference": backend == "torch" and row["dtype"] == "fp32"}


def run_suite(name: str, config: str, a) -> list[dict]:
    """One configuration of a suite of the project's own environment, measured in this process."""
    from ldm_engine.loading import load_checkpoint

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    folder, work = Path(a.folder), Path(a.work)
    if name == "direct":
        return direct_rows(load_checkpoint(folder), a.res, a.repeat)
    if name == "ldm_engine":
        return [ldm_engine_row(load_checkpoint(folder), config, a, work, say)]
    if config == "eager bf16" and not a.native_bf16:
        return [{"suite": "diffusers", "backend": f"diffusers {config}",
                 "skipped": "this CPU has no native bf16 (no AMX or AVX512_BF16): torch emulates it, "
                            "slower than fp32, so no user would run it here"}]
    dtype = torch.bfloat16 if config.endswith("bf16") else torch.float32
    say(f"[diffusers {config}]")
    return [diffusers_rows(folder, a.res, a.steps, a.repeat, dtype, config, config.startswith("torch.compile"),
                           work)]


# ---- running the suites --------------------------------------------------------------------------

def run_child(cmd: list[str], suite: str, say, label: str | None = None) -> list[dict]:
    """Rows a child process prints on stdout; its stderr is shown as it comes. A child that fails keeps
    the rows it finished and adds one saying how it ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []

    def relay():
        for line in proc.stderr:
            say(line.rstrip())
            tail[:] = (tail + [line.strip()])[-5:]

    import threading

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    rows = [json.loads(line) for line in proc.stdout if line.startswith("{")]
    proc.wait()
    relay_thread.join()
    if proc.returncode != 0:
        last = next((t for t in reversed(tail) if t), "no message")
        rows.append({"suite": suite, "backend": label or suite,
                     "skipped": f"exited with {proc.returncode}: {last}"})
    return rows


def peer_cmd(suite: str, a, say) -> tuple[list[str] | None, str | None]:
    """The command running a peer's script in its own venv, or (None, why the venv could not be made)."""
    from peer_venvs import PEERS, ensure_venv

    python, why = ensure_venv(PEERS[PEER_VENVS[suite]], say=say)
    if python is None:
        return None, why
    script = Path(__file__).resolve().parent / "peers" / PEER_SCRIPTS[suite]
    common = ["--res", str(a.res), "--steps", str(a.steps), "--repeat", str(a.repeat)]
    if suite == "optimum-intel":
        from ldm_engine.optimize.int8 import CALIBRATION_PROMPTS  # the prompts ldm_engine's int8 calibrates on

        prompts = Path(a.work) / "calibration_prompts.json"
        prompts.write_text(json.dumps(list(CALIBRATION_PROMPTS)))
        return [str(python), str(script), "--folder", a.folder, "--work", str(Path(a.work) / "optimum-intel"),
                "--prompts", str(prompts), *common], None
    return [str(python), str(script), "--model", a.single_file, *common], None


def add_psnr(rows: list[dict]) -> None:
    """PSNR of every row's image against ldm_engine's torch fp32 image (same weights, latents, sampler)."""
    from ldm_engine.bench import psnr

    ref = next((np.load(r["image"]) for r in rows if r.get("reference")), None)
    for r in rows:
        image = r.pop("image", None)
        r.pop("reference", None)
        if ref is not None and image is not None and Path(image).is_file():
            db = psnr(ref, np.load(image))
            r["psnr_db"] = round(db, 2) if np.isfinite(db) else None  # None: identical (the reference itself)


def report(rows: list[dict]) -> None:
    print(f"\n{'suite':20s} {'backend':34s} {'prec':5s} {'UNet step s':>11s} {'e2e s':>8s} {'it/s':>6s} "
          f"{'peak MB':>8s} {'PSNR dB':>8s} {'step ×best':>10s}")
    exact = [r for r in rows if r["suite"] == "ldm_engine" and r.get("precision") in ("fp32", "bf16")
             and "unet_step_s" in r]
    best = min(exact, key=lambda r: r["unet_step_s"]) if exact else None
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else ""  # noqa: E731
    for r in rows:
        if "skipped" in r:
            print(f"{r['suite']:20s} {r['backend']:34s} skipped: {r['skipped']}")
            continue
        ratio = r["unet_step_s"] / best["unet_step_s"] if best else None
        print(f"{r['suite']:20s} {r['backend']:34s} {str(r.get('precision', '')):5s} {r['unet_step_s']:11.3f} "
              f"{fmt(r.get('end_to_end_s'), '8.2f'):>8s} {fmt(r.get('it_per_s'), '6.2f'):>6s} "
              f"{fmt(r.get('peak_mem_mb'), '8.0f'):>8s} {fmt(r.get('psnr_db'), '8.1f'):>8s} {fmt(ratio, '10.2f'):>10s}")
    if best is None:
        return
    by = {r["backend"]: r for r in rows if "unet_step_s" in r}
    print(f"\nbest exact ldm_engine backend per UNet step: {best['backend']} {best['precision']} "
          f"({best['unet_step_s']:.3f} s)")
    ours_int8 = next((r for r in rows if r["suite"] == "ldm_engine" and r.get("precision") == "int8"
                      and "unet_step_s" in r), None)
    for peer in ("optimum-intel default", "optimum-intel int8-hybrid", "stable-diffusion.cpp f16",
                 "stable-diffusion.cpp q8_0", "diffusers torch.compile bf16", "diffusers torch.compile fp32",
                 "diffusers eager fp32"):
        if peer not in by:
            continue
        p = by[peer]
        line = f"  vs {peer} ({p.get('precision')}): exact {p['unet_step_s'] / best['unet_step_s']:.2f}x per UNet step"
        if ours_int8 is not None:
            line += f", int8 {p['unet_step_s'] / ours_int8['unet_step_s']:.2f}x"
        if p.get("end_to_end_s") and best.get("end_to_end_s"):
            line += f"; end to end {p['end_to_end_s'] / best['end_to_end_s']:.2f}x"
        print(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd-1.5")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3, help="UNet calls per step median; end-to-end runs are half")
    p.add_argument("--skip", nargs="*", default=[], choices=SUITES)
    p.add_argument("--work", help="where the model files, exported peer models and images live "
                                  "(default ~/.cache/ldm_engine/side_by_side)")
    p.add_argument("--json")
    p.add_argument("--suite", help=argparse.SUPPRESS)  # a child process: one suite of this environment
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    a = p.parse_args()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    from ldm_engine.bench_machine import cpu_name, has_native_bf16, isa_flags

    a.native_bf16 = has_native_bf16(isa_flags())
    if a.suite:
        for row in run_suite(a.suite, a.config, a):
            print(json.dumps(row), flush=True)
        return 0
    if a.steps <= 2:
        p.error("--steps must be more than 2 (stable-diffusion.cpp's step time is a difference of runs)")
    from peer_fixtures import write_fixtures

    root = Path(a.work or Path.home() / ".cache" / "ldm_engine" / "side_by_side")
    files = write_fixtures(a.arch, a.res // 8, root, say)
    a.folder, a.single_file = str(files["diffusers"]), str(files["single_file"])
    a.work = str(files["diffusers"].parent / f"res{a.res}")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "isa": isa_flags()}
    say(f"{a.arch} (random weights), {a.res}x{a.res}, CFG batch 2, {a.steps} DDIM steps, {os.cpu_count()} cores, "
        f"{machine['cpu']} ({machine['isa'] or 'no AVX2 or newer'})")
    rows = []
    for suite in SUITES:
        if suite in a.skip:
            continue
        say(f"== {suite}")
        if suite in PEER_SCRIPTS:
            cmd, why = peer_cmd(suite, a, say)
            if cmd is None:
                rows.append({"suite": suite, "backend": suite, "skipped": why})
                continue
            flag, configs = PEER_CONFIGS[suite]
            for config in configs:
                rows.extend(run_child([*cmd, flag, config], suite, say, f"{suite} {config}"))
            continue
        for config in own_configs(suite, a.native_bf16):
            cmd = [sys.executable, __file__, "--suite", suite, "--config", config, "--folder", a.folder,
                   "--work", a.work, "--res", str(a.res), "--steps", str(a.steps), "--repeat", str(a.repeat)]
            rows.extend(run_child(cmd, suite, say, f"{suite} {config}"))
    add_psnr(rows)
    rows = [{**r, **machine, "res": a.res, "steps": a.steps} for r in rows]
    emit(rows)
    print(f"\n{a.arch} random weights, {a.res}x{a.res}, {a.steps} steps; {machine['cpu']}, {os.cpu_count()} cores, "
          f"ISA: {machine['isa']}")
    report(rows)
    emit(rows, a.json, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
