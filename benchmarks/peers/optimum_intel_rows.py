"""optimum-intel's OVStableDiffusionPipeline, run in its own venv (benchmarks/peer_venvs.py) by
benchmarks/side_by_side.py; one JSON row per configuration on stdout.

    python optimum_intel_rows.py --folder DIFFUSERS_FOLDER --res 256 --steps 20 --repeat 3 --work DIR
                                 [--configs default,int8-hybrid] [--prompts FILE]

Configurations, each exported once into --work (in a process of its own: --export) and reused:
  default       what `OVStableDiffusionPipeline.from_pretrained(folder, export=True)` gives: OpenVINO's
                default CPU precision (bf16 where the CPU has native bf16, else f32; the row records which)
  int8-hybrid   the same with `OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts)`:
                UNet weights and activations int8 (calibrated on the pipeline's own sampling of the prompts),
                other parts weight-only int8 — optimum-intel's documented recipe for SD on CPU
Both are reshaped to static shapes (batch 1 with CFG, the benchmark's size), as optimum-intel's docs advise
for CPU speed. UNet step: the median of pipe.unet calls on the CFG batch; end to end: the pipeline with DDIM,
the same prompt, guidance and the latents torch.randn(seed 0) gives, so images compare with ldm_engine's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import median_time, process_peak_mb, peer_args, print_rows  # noqa: E402

GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"
CALIBRATION_SAMPLES = 50  # UNet calls collected; optimum-intel samples whole 50-step runs, so one prompt


def export(config: str, folder: Path, work: Path, prompts: list[str], say) -> None:
    """Export (and quantize) one configuration into work/config; run in a process of its own (--export)
    so that the measured process's peak memory is that of loading and running, as for ldm_engine's rows
    (whose graphs come from its artifact cache)."""
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    kwargs = {}
    if config == "int8-hybrid":
        kwargs["quantization_config"] = OVWeightQuantizationConfig(
            bits=8, quant_method="hybrid", dataset=prompts, num_samples=CALIBRATION_SAMPLES)
    say(f"[optimum-intel {config}] exporting{' and quantizing' if kwargs else ''} {folder} (once)")
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, export=True, compile=False, **kwargs)
    partial = work / f"{config}.partial"  # renamed once whole: a run cut short (full disk) is not reused
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(work / config, ignore_errors=True)
    pipe.save_pretrained(partial)
    partial.rename(work / config)


def load(config: str, a, say):
    """The pipeline of one configuration, exported into work/config first if it is not there yet."""
    from optimum.intel import OVStableDiffusionPipeline

    saved, prepare_s = Path(a.work) / config, 0.0
    if not (saved / "model_index.json").is_file():
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--export", "--configs", config, "--folder", a.folder, "--work", a.work]
        subprocess.run(cmd + (["--prompts", a.prompts] if a.prompts else []), check=True)
        prepare_s = time.perf_counter() - t0
    return OVStableDiffusionPipeline.from_pretrained(saved, compile=False), prepare_s


def rows(a, say) -> list[dict]:
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for config in a.configs.split(","):
        pipe, prepare_s = load(config, a, say)
        pipe.reshape(batch_size=1, height=a.res, width=a.res, num_images_per_prompt=1)
        pipe.compile()
        pipe.set_progress_bar_config(disable=True)
        hint = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
        precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # f32 / bf16 / f16
        quantized = sum(op.get_type_name() == "FakeQuantize" for op in pipe.unet.model.get_ops())
        h = a.res // pipe.vae_scale_factor
        unet_in = {i.get_any_name(): i for i in pipe.unet.model.inputs}
        feeds = dict(sample=np.random.randn(2, 4, h, h).astype(np.float32),
                     timestep=np.full((1,), 500, unet_in["timestep"].get_element_type().to_dtype()),
                     encoder_hidden_states=np.random.randn(2, 77, unet_in["encoder_hidden_states"].partial_shape[2]
                                                           .get_length()).astype(np.float32))
        step = median_time(lambda: pipe.unet(**feeds), a.repeat)
        latents = torch.randn((1, 4, h, h), generator=torch.Generator().manual_seed(0))

        def txt2img():
            return pipe(PROMPT, num_inference_steps=a.steps, guidance_scale=GUIDANCE, height=a.res, width=a.res,
                        latents=latents, output_type="np").images

        txt2img()  # warm-up
        times = []
        for _ in range(max(1, a.repeat // 2)):
            t0 = time.perf_counter()
            image = txt2img()
            times.append(time.perf_counter() - t0)
        np.save(work / f"image-{config}-{a.res}.npy", np.asarray(image[0], np.float32))
        e2e = float(np.median(times))
        out.append({"suite": "optimum-intel", "backend": f"optimum-intel {config}", "precision": precision,
                    "unet_step_s": step, "end_to_end_s": e2e, "it_per_s": 1.0 / step,
                    "peak_mem_mb": process_peak_mb(), "unet_fake_quantize_ops": quantized,
                    "prepare_s": round(prepare_s, 1),
                    "image": str(work / f"image-{config}-{a.res}.npy")})
        say(f"[optimum-intel {config}] {precision}: UNet step {step:.3f} s, end to end {e2e:.2f} s")
        pipe = None  # freed before the next configuration loads
    return out


def main() -> int:
    _, a = peer_args(__doc__, ("--folder", {"required": True}), ("--work", {"required": True}),
                     ("--configs", {"default": "default,int8-hybrid"}),
                     ("--prompts", {"help": "JSON list of calibration prompts for int8-hybrid"}),
                     ("--export", {"action": "store_true", "help": "only export --configs into --work"}))
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.export:
        prompts = json.loads(Path(a.prompts).read_text()) if a.prompts else [PROMPT]
        for config in a.configs.split(","):
            export(config, Path(a.folder), Path(a.work), prompts, say)
        return 0
    return print_rows(rows(a, say))


if __name__ == "__main__":
    sys.exit(main())
