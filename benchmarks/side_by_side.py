"""ldm_engine's backends next to what a user would otherwise run, in one process sequence on the same
architecture and resolution (random weights: timings do not depend on them).

    python benchmarks/side_by_side.py [--arch sd-1.5] [--res 256] [--steps 20] [--repeat 3] [--json FILE]

Rows (one JSON object each), then a table with the ratios the performance targets are about:
  ldm_engine       torch fp32 / bf16, onnxruntime fp32, openvino fp32 / bf16: the real Pipeline,
                   timed per stage as ldm-bench does; PSNR against ldm_engine torch fp32
  diffusers        StableDiffusionPipeline of the same architecture, torch fp32 and bf16: UNet step
                   median and a full txt2img run with the same steps, size and guidance
  direct runtimes  the very ONNX graph ldm_engine exported, loaded the plain way: OpenVINO
                   compile_model with only the precision hint (bf16 / f32) and an ONNX Runtime
                   session with default options: UNet step median on the CFG batch
"""
from __future__ import annotations

import argparse
import gc
import sys

import numpy as np
import torch

from report import emit, median_time

GUIDANCE = 7.5


# ---- diffusers with the same architecture ---------------------------------------------------------

def diffusers_pipeline(cfg, dtype):
    """A diffusers StableDiffusionPipeline with cfg's architecture and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    u = cfg.unet
    levels = len(u.channel_mult)
    attn = [2**i in u.attention_resolutions for i in range(levels)]
    chans = [u.model_channels * m for m in u.channel_mult]
    heads = [u.num_heads if u.num_head_channels == -1 else c // u.num_head_channels for c in chans]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=tuple(chans), layers_per_block=u.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=u.context_dim, attention_head_dim=tuple(heads) if len(set(heads)) > 1 else heads[0],
        use_linear_projection=u.use_linear_in_transformer, norm_num_groups=u.norm_groups)
    v = cfg.vae
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v.embed_dim,
                        block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
                        down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult), norm_num_groups=v.norm_groups)
    t = cfg.text_encoder
    text = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers,
                                        num_attention_heads=t.heads, intermediate_size=t.intermediate_size,
                                        max_position_embeddings=t.max_length, hidden_act="quick_gelu"))
    s = cfg.schedule
    sched = DDIMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=s.steps_offset, timestep_spacing=s.timestep_spacing)
    mods = [m.eval().requires_grad_(False).to(dtype) for m in (unet, vae, text)]
    return mods[0], mods[1], mods[2], sched


def diffusers_rows(cfg, tokenizer, res: int, steps: int, repeat: int, dtype, name: str) -> dict:
    from diffusers import StableDiffusionPipeline

    unet, vae, text, sched = diffusers_pipeline(cfg, dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ids = tokenizer(["a photograph of an astronaut riding a horse", ""])
    h = res // cfg.vae.downsampling_factor
    x = torch.randn(2, cfg.unet.in_channels, h, h, dtype=dtype)
    with torch.no_grad():
        ctx = text(ids)[0]
        step = median_time(lambda: unet(x, 500, encoder_hidden_states=ctx), repeat)

    def txt2img():  # the text encoder runs inside the timed call, as it does in ldm_engine's pipeline
        with torch.no_grad():
            emb = text(ids)[0]
        return pipe(prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], num_inference_steps=steps,
                    guidance_scale=GUIDANCE, height=res, width=res, output_type="np",
                    generator=torch.Generator().manual_seed(0))

    e2e = median_time(txt2img, max(1, repeat // 2))
    return {"suite": "diffusers", "backend": name, "unet_step_s": step, "end_to_end_s": e2e}


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

    def openvino_step(precision: str) -> float:
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        return median_time(lambda: request.infer(feeds), repeat)

    rows = [{"suite": "direct", "backend": f"openvino {p}", "unet_step_s": openvino_step(p)} for p in ("bf16", "f32")]
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rows.append({"suite": "direct", "backend": "onnxruntime fp32",
                 "unet_step_s": median_time(lambda: session.run(None, feeds), repeat)})
    return rows


def run_suite(name: str, a) -> list[dict]:
    """One suite's rows, measured in this process."""
    from ldm_engine.bench import bench_config, gemm_roofline, psnr, unet_gflop
    from ldm_engine.loading import random_model

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    model = random_model(a.arch)
    if name == "direct":
        return direct_rows(model, a.res, a.repeat)
    if name == "diffusers":
        rows = []
        for dtype, label in ((torch.float32, "torch fp32"), (torch.bfloat16, "torch bf16")):
            say(f"[diffusers {label}]")
            rows.append(diffusers_rows(model.config, model.tokenizer, a.res, a.steps, a.repeat, dtype, label))
        return rows
    rooflines = {"fp32": gemm_roofline(torch.float32), "bf16": gemm_roofline(torch.bfloat16)}
    gflop = unet_gflop(model.config, 1, a.res)
    rows, ref = [], None
    for backend, dtype in [("torch", "fp32"), ("openvino", "auto"), ("openvino", "fp32"), ("onnxruntime", "fp32"),
                           ("torch", "bf16")]:
        row, img = bench_config(model, backend, dtype, a.res, 1, a.steps, 1, max(1, a.repeat // 2), "cpu",
                                gflop, rooflines, GUIDANCE, say)
        gc.collect()  # the timed backend (held in a reference cycle by its call timers) goes before the next
        ref = img if ref is None else ref  # the first configuration, torch fp32, is the reference
        db = psnr(ref, img)
        rows.append({"suite": "ldm_engine", **row, "psnr_db": db if np.isfinite(db) else None})
    return rows


def main() -> int:
    import json
    import subprocess

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd-1.5")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3, help="UNet calls per step median; ldm_engine e2e runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["diffusers", "direct", "ldm_engine"])
    p.add_argument("--json")
    p.add_argument("--suite", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.suite:  # a child process: one suite, rows on stdout
        for row in run_suite(a.suite, a):
            print(json.dumps(row), flush=True)
        return 0
    print(f"{a.arch} (random weights), {a.res}x{a.res}, CFG batch 2, {a.steps} steps, {torch.get_num_threads()} threads",
          file=sys.stderr)
    rows = []
    # each suite in its own process, one after another: memory is returned between them, and no
    # runtime's process-wide state (ONNX Runtime's thread pool) leaks into a peer's measurement
    for suite in ("ldm_engine", "direct", "diffusers"):
        if suite in a.skip:
            continue
        out = subprocess.run([sys.executable, __file__, "--suite", suite, "--arch", a.arch, "--res", str(a.res),
                              "--steps", str(a.steps), "--repeat", str(a.repeat)], stdout=subprocess.PIPE, text=True,
                             check=True)
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                emit(rows[-1:])
    print(f"\n{'suite':11s} {'backend':18s} {'UNet step s':>11s} {'e2e s':>8s} {'PSNR dB':>8s}")
    for r in rows:
        e2e = f"{r['end_to_end_s']:8.2f}" if r.get("end_to_end_s") else f"{'':8s}"
        db = f"{r['psnr_db']:8.1f}" if r.get("psnr_db") is not None else f"{'':8s}"
        name = r["backend"] + (f" {r['dtype']}" if r["suite"] == "ldm_engine" else "")
        print(f"{r['suite']:11s} {name:18s} {r['unet_step_s']:11.3f} {e2e} {db}")
    ours = [r for r in rows if r["suite"] == "ldm_engine" and r["backend"] != "torch"]
    peer = {r["backend"]: r for r in rows if r["suite"] in ("direct", "diffusers")}
    if ours:
        best = min(ours, key=lambda r: r["unet_step_s"])
        print(f"\nbest ldm_engine CPU backend per UNet step: {best['backend']} {best['dtype']} "
              f"({best['unet_step_s']:.3f} s, {best['psnr_db']:.1f} dB vs fp32)")
        if "openvino bf16" in peer:
            print(f"per UNet step vs OpenVINO bf16 called directly: "
                  f"{peer['openvino bf16']['unet_step_s'] / best['unet_step_s']:.2f}x")
        fastest = min(ours, key=lambda r: r["end_to_end_s"])
        if "torch bf16" in peer:
            print(f"end to end vs diffusers bf16: {peer['torch bf16']['end_to_end_s'] / fastest['end_to_end_s']:.2f}x "
                  f"({fastest['backend']} {fastest['dtype']}, {fastest['psnr_db']:.1f} dB vs fp32)")
    emit(rows, a.json, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
