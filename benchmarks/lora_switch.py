"""What switching a LoRA costs on each CPU backend, next to loading the model afresh.

    python benchmarks/lora_switch.py [--arch sd-1.5] [--res 256] [--rank 16] [--backend torch,onnxruntime,openvino]

A random-weight checkpoint of the architecture and a random kohya-format LoRA (rank `--rank` on every
attention and feed-forward Linear of the UNet and the text encoder, the layers people train) are
written to a temporary folder. Per backend, each in its own subprocess so memory and thread pools
start clean:
  fresh      Pipeline.from_pretrained(file, backend) + one 1-step generation (graph backends: the
             artifact cache already holds the graphs, as it does for a user's second run)
  load       pipe.load_lora(file) + one 1-step generation
  switch     a second LoRA replaces the first (unload + load) + one 1-step generation
  lora step  one more 1-step generation with that LoRA (the per-step cost of weights swapped in)
  unload     pipe.unload_loras() + one 1-step generation
Every figure includes the same single denoising step, so the ratios compare what surrounds it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_checkpoint(arch: str, path: Path) -> None:
    from ldm_engine.loading import random_model
    from ldm_engine.loading.export import save_single_file

    m = random_model(arch)
    save_single_file(path, m.config, m.unet, m.vae, m.text_encoder)


def write_lora(arch: str, path: Path, rank: int, seed: int) -> int:
    """A kohya LoRA in the original-layout naming over every transformer Linear; returns its module count."""
    from safetensors.torch import save_file

    from ldm_engine.models import CLIPTextEncoder, UNetModel, get_preset

    cfg = get_preset(arch)
    with torch.device("meta"):  # only the module names and shapes are needed
        unet, text_encoder = UNetModel(cfg.unet), CLIPTextEncoder(cfg.text_encoder)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, module in (("lora_unet_", unet), ("lora_te_text_model_", text_encoder)):
        for name, sub in module.named_modules():
            if not isinstance(sub, torch.nn.Linear):
                continue
            if prefix == "lora_unet_" and "transformer_blocks" not in name:
                continue
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, sub.in_features, generator=g) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(sub.out_features, rank, generator=g) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(tensors) // 3


def run_one(backend: str, ckpt: Path, loras: list[Path], res: int) -> dict:
    from ldm_engine import Pipeline

    def step(pipe):
        pipe("a photo of a cat", num_inference_steps=1, height=res, width=res, seed=0, progress=False,
             output_type="latent")

    row = {"backend": backend}
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(ckpt, backend=backend)
    step(pipe)
    row["fresh_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(pipe)
    row["step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.load_lora(loras[0], scale=0.8)
    step(pipe)
    row["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.unload_loras()
    pipe.load_lora(loras[1], scale=0.8)
    step(pipe)
    row["switch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(pipe)
    row["lora_step_s"] = time.perf_counter() - t0  # graph backends: the original graph + swapped-in tensors
    t0 = time.perf_counter()
    pipe.unload_loras()
    step(pipe)
    row["unload_s"] = time.perf_counter() - t0
    row["switch_vs_fresh"] = row["switch_s"] / row["fresh_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd-1.5")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--backend", default="torch,onnxruntime,openvino")
    p.add_argument("--child", nargs=3, metavar=("BACKEND", "CKPT", "LORAS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        backend, ckpt, loras = a.child
        print(json.dumps(run_one(backend, Path(ckpt), [Path(x) for x in loras.split(",")], a.res)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / f"{a.arch}.safetensors"
        write_checkpoint(a.arch, ckpt)
        loras = [tmp / f"lora{i}.safetensors" for i in range(2)]
        n = [write_lora(a.arch, path, a.rank, seed=i) for i, path in enumerate(loras)][0]
        print(f"{a.arch}, {a.res}x{a.res}, LoRA rank {a.rank} on {n} modules", file=sys.stderr)
        rows = []
        for backend in a.backend.split(","):
            if backend != "torch":  # fill the artifact cache first: 'fresh' is a user's second run
                subprocess.run([sys.executable, __file__, "--res", str(a.res), "--child", backend, str(ckpt),
                                ",".join(map(str, loras))], check=True, capture_output=True)
            out = subprocess.run([sys.executable, __file__, "--res", str(a.res), "--child", backend, str(ckpt),
                                  ",".join(map(str, loras))], check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print("\n| backend | fresh load s | 1 step s | load LoRA s | switch LoRA s | 1 step with LoRA s | unload s | "
          "switch / fresh |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['fresh_s']:.1f} | {r['step_s']:.1f} | {r['load_s']:.1f} | {r['switch_s']:.1f} | "
              f"{r['lora_step_s']:.1f} | {r['unload_s']:.1f} | {r['switch_vs_fresh']:.2f} |")


if __name__ == "__main__":
    main()
