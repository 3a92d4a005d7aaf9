"""Train (and evaluate) the embedded default model: a small text-to-image LDM on procedural shapes.

    python -m ldm_engine.training.shapes --stage all --out shapes_run
    python -m ldm_engine.training.shapes --stage autoencoder --out shapes_run
    python -m ldm_engine.training.shapes --stage ldm --out shapes_run      # needs shapes_run/autoencoder.safetensors
    python -m ldm_engine.training.shapes --evaluate shapes_run/shapes-ldm.safetensors --grid grid.png

Seeds are fixed; loss curves are printed and written as JSON beside the weights.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..loading.export import save_single_file
from ..models import AutoencoderKL
from ..models.configs import to_dict
from .stages import AE_CONFIG, latent_scale, model_config, train_autoencoder, train_ldm

AE_STEPS, LDM_STEPS = 1000, 3000


def _tail_mean(curve: list[float], n: int = 50) -> float:
    return sum(curve[-n:]) / len(curve[-n:])


def _save_curve(path: Path, curve: list[float], seconds: float) -> None:
    path.write_text(json.dumps({"seconds": round(seconds, 1), "loss": [round(v, 6) for v in curve]}))


def stage_autoencoder(out: Path, steps: int, seed: int) -> AutoencoderKL:
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    ae, curve = train_autoencoder(steps, seed=seed)
    seconds = time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(out / "autoencoder.safetensors"),
              metadata={"ldm_engine_autoencoder": json.dumps(to_dict(AE_CONFIG))})
    _save_curve(out / "autoencoder_loss.json", curve, seconds)
    print(f"autoencoder: {steps} steps in {seconds / 60:.1f} min, final loss {_tail_mean(curve):.4f}")
    return ae


def stage_ldm(out: Path, steps: int, seed: int, ae: AutoencoderKL | None = None) -> Path:
    from safetensors.torch import load_file

    if ae is None:
        path = out / "autoencoder.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run --stage autoencoder first")
        ae = AutoencoderKL(AE_CONFIG)
        ae.load_state_dict(load_file(str(path)))
        ae.eval().requires_grad_(False)
    t0 = time.perf_counter()
    scale = latent_scale(ae)
    unet, text, curve = train_ldm(ae, scale, steps, seed=seed)
    seconds = time.perf_counter() - t0
    target = out / "shapes-ldm.safetensors"
    save_single_file(target, model_config(scale), unet, ae, text, dtype=torch.float16)  # half the bytes; loads as fp32
    _save_curve(out / "ldm_loss.json", curve, seconds)
    print(f"latent diffusion: {steps} steps in {seconds / 60:.1f} min (latent scale {scale:.4f}), "
          f"final loss {_tail_mean(curve):.4f}; wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


def evaluate(model: Path, n: int, grid: Path | None, seed: int = 0, cache_interval: int | None = None,
             backend: str = "torch", dtype=None) -> dict:
    """The checker's accuracy on n generations of held-out captions (and on real renders of them);
    `cache_interval` samples with the DeepCache step cache (branch 0); `backend` / `dtype` as Pipeline's
    (e.g. openvino with dtype="int8")."""
    from ..pipeline import Pipeline
    from .checker import accuracy
    from .data import HELD_OUT, caption, render

    pipe = Pipeline.from_pretrained(model, backend=backend, dtype=dtype)
    rng = random.Random(seed)
    triples = [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]
    images = []
    for i in range(0, n, 32):
        chunk = triples[i:i + 32]
        out = pipe([caption(*t) for t in chunk], num_inference_steps=20, guidance_scale=4.0, seed=seed + i,
                   output_type="np", progress=False, cache_interval=cache_interval)
        images.extend((out.images * 255).round().astype("uint8"))
    real = [render(*t, rng) for t in triples]
    result = {"generated": accuracy(images, triples), "real": accuracy(real, triples), "n": n,
              "held_out_triples": len(HELD_OUT), "cache_interval": cache_interval, "backend": backend,
              "dtype": None if dtype is None else str(dtype).replace("torch.", "")}
    print(json.dumps(result, indent=1))
    if grid is not None:
        from PIL import Image

        cols = 8
        rows = min(8, (len(images) + cols - 1) // cols)
        sheet = Image.new("RGB", (cols * 64, rows * 64), "white")
        for k, img in enumerate(images[: cols * rows]):
            sheet.paste(Image.fromarray(img), ((k % cols) * 64, (k // cols) * 64))
        sheet.save(grid)
        print(f"wrote {grid}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_engine.training.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["autoencoder", "ldm", "all"])
    p.add_argument("--out", type=Path, default=Path("shapes_run"))
    p.add_argument("--ae-steps", type=int, default=AE_STEPS)
    p.add_argument("--ldm-steps", type=int, default=LDM_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", type=Path, help="a trained model file: report the checker's accuracies")
    p.add_argument("--n", type=int, default=256, help="generations for --evaluate (default 256)")
    p.add_argument("--grid", type=Path, help="with --evaluate: write a grid of samples here")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="with --evaluate: sample with the DeepCache step cache, the whole UNet every N-th step")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "openvino"],
                   help="with --evaluate: the backend that samples (default torch)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8"],
                   help="with --evaluate: its precision (default: the backend's own; int8: openvino only)")
    a = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    if a.evaluate:
        from ..cli import _dtype

        evaluate(a.evaluate, a.n, a.grid, cache_interval=a.cache_interval, backend=a.backend, dtype=_dtype(a.dtype))
        return 0
    if not a.stage:
        p.error("give --stage or --evaluate")
    a.out.mkdir(parents=True, exist_ok=True)
    ae = stage_autoencoder(a.out, a.ae_steps, a.seed) if a.stage in ("autoencoder", "all") else None
    if a.stage in ("ldm", "all"):
        stage_ldm(a.out, a.ldm_steps, a.seed, ae)
    return 0


if __name__ == "__main__":
    sys.exit(main())
