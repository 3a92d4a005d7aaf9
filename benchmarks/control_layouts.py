"""Which graph layout runs a ControlNet step faster on OpenVINO: split or fused.

    python benchmarks/control_layouts.py [--arch sd-1.5] [--res 256] [--precision auto|f32|bf16]
                                         [--repeat 10] [--graphs DIR] [--json FILE]

A random-weight model of the architecture and a random ControlNet of its UNet are exported as fp32 ONNX
(into --graphs, reused by later runs; default: a temporary folder) in both layouts:
  split   the `controlnet` graph (residuals) + the `unet_control` graph (the UNet taking them), run as the
          OpenVINO backend runs them, the residuals handed over and scaled in between
  fused   one `unet_control_fused` graph, UNet and ControlNet together (TensorRT demo/Diffusion's layout),
          the scales going in as data
Each is compiled for the static shapes of one call with the precision hint (bf16 needs AVX512_BF16 or
AMX; `auto` picks it where present) and the timestep embedding fed in f32, as the backend does. Timed:
the median of --repeat calls at the CFG batch (2 latents, one image), the two layouts called in turn
after one warm-up round; the ratio split / fused > 1 means the fused graph is faster.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tempfile
from pathlib import Path

import numpy as np
import torch

from report import emit


def interleaved_medians(fns, repeat: int) -> list[float]:
    """Median wall time of each of `fns` over `repeat` rounds that call them in turn (after one untimed
    warm-up round): load that changes during the run slows every layout alike."""
    times = [[] for _ in fns]
    for r in range(repeat + 1):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if r:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def random_net(model, folder: Path):
    from ldm_engine.bench_control import random_controlnet_file
    from ldm_engine.control import read_controlnet

    net = read_controlnet(random_controlnet_file(model, folder), model.config.unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised convs made random too, so that the two layouts' outputs compare
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def fused_graph(model, net, cache) -> Path:
    """The fused graph in the artifact cache under `cache`, keyed by the UNet's and the ControlNet's weights."""
    from ldm_engine.export.artifacts import onnx_runtime_tag
    from ldm_engine.export.cache import artifact_key, weights_hash
    from ldm_engine.export.graphs import FUSED_CONTROL
    from ldm_engine.export.onnx_export import export_component

    weights = weights_hash(model.unet, model.config.unet) + weights_hash(net, net.control_config)
    key = artifact_key(FUSED_CONTROL, weights, "dynamic", "fp32", onnx_runtime_tag())

    def build(folder: Path) -> dict:
        export_component(model, FUSED_CONTROL, folder / "model.onnx", controlnet=net)
        return {"component": FUSED_CONTROL}

    return cache.get_or_build("onnx", key, build) / "model.onnx"


def measure(arch: str, res: int, precision: str, repeat: int, graphs: Path) -> dict:
    from ldm_engine.backends.graph_backend import _np
    from ldm_engine.backends.openvino_backend import OpenVINOBackend
    from ldm_engine.bench_machine import cpu_name, isa_flags
    from ldm_engine.export.cache import ArtifactCache
    from ldm_engine.loading import random_model
    from ldm_engine.models.unet import timestep_embedding

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "auto": None}[precision]
    graphs.mkdir(parents=True, exist_ok=True)
    model = random_model(arch)
    backend = OpenVINOBackend(model, dtype=dtype, cache_dir=graphs)  # refuses bf16 without bf16 instructions
    net = random_net(model, graphs)
    backend.prepare_controlnet(net)
    n = net.control_config.num_residuals
    f = model.config.vae.downsampling_factor
    tokens = model.text_encoder.config.max_length if model.text_encoder is not None else 77
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, model.config.unet.in_channels, res // f, res // f, generator=g)
    ctx = torch.randn(2, tokens, model.config.unet.context_dim, generator=g)
    hint, t = torch.rand(2, 3, res, res, generator=g), torch.tensor(500.0)
    scales = torch.full((2, n), 0.8)

    def split():
        residuals = backend.controlnet(net, z, t, ctx, hint)
        return backend.denoise(z, t, ctx, {"control": [r * s for r, s in zip(residuals, scales[0])]})

    print(f"{arch}: exporting / compiling both layouts", file=sys.stderr, flush=True)
    split_out = split()  # exports (first run) and compiles the split graphs
    # the fused graph, compiled as the backend compiles its graphs: static shapes, the embedding fed in f32
    ov_model = backend.core.read_model(str(fused_graph(model, net, ArtifactCache(graphs))))
    if backend.precision != "f32":
        ov_model = backend._embedding_as_input(ov_model, "fused")
    width = backend._embed_outside.get("fused")
    feeds = {"sample": _np(z, np.float32), "timestep": np.full((2,), 500.0, np.float32),
             "context": _np(ctx, np.float32), "hint": _np(hint, np.float32), "control_scales": _np(scales, np.float32)}
    if width is not None:
        feeds["timestep_embedding"] = timestep_embedding(torch.full((2,), 500.0), width).numpy()
        del feeds["timestep"]
    ov_model.reshape({k: list(v.shape) for k, v in feeds.items()})
    request = backend.core.compile_model(ov_model, "CPU", backend.config).create_infer_request()

    def fused():
        request.infer(feeds, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    err = float((fused() - split_out).abs().max())
    split_s, fused_s = interleaved_medians((split, fused), repeat)
    return {"arch": arch, "res": res, "batch": 2, "precision": backend.precision, "cpu": cpu_name(),
            "isa": isa_flags(), "threads": backend.threads, "split_s": split_s, "fused_s": fused_s,
            "split_over_fused": split_s / fused_s, "max_abs_split_vs_fused": err}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd-1.5", help="model preset, random weights (default sd-1.5)")
    p.add_argument("--res", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--precision", choices=("auto", "f32", "bf16"), default="auto",
                   help="OpenVINO inference precision hint (auto: bf16 where the CPU has it)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--graphs", type=Path, default=None, help="artifact cache for the graphs (default: temporary)")
    p.add_argument("--json", default=None, help="also write the row to this file")
    a = p.parse_args()
    import openvino as ov

    from ldm_engine.backends.openvino_backend import cpu_supports_bf16
    from ldm_engine.bench_machine import cpu_name, isa_flags

    if a.precision == "bf16" and not cpu_supports_bf16(ov.Core()):
        print(f"error: --precision bf16 needs bf16 instructions (AVX512_BF16 or AMX), and this CPU ({cpu_name()}: "
              f"{isa_flags() or 'none of them'}) has neither; run with --precision f32", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix="control-layouts-") if a.graphs is None else None
    try:
        row = measure(a.arch, a.res, a.precision, a.repeat, a.graphs or Path(tmp.name))
    except ValueError as e:  # a bad --arch / --res
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    emit([row], a.json)
    print(f"\n{row['cpu']} ({row['isa']}), {row['threads']} threads, OpenVINO {row['precision']}, "
          f"{a.arch} {a.res}x{a.res}, CFG batch 2")
    print("| layout | ms per step |\n|---|---|")
    print(f"| split (controlnet + unet_control) | {1e3 * row['split_s']:.1f} |")
    print(f"| fused (unet_control_fused) | {1e3 * row['fused_s']:.1f} |")
    print(f"split / fused: {row['split_over_fused']:.3f}; outputs differ by at most "
          f"{row['max_abs_split_vs_fused']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
