"""Export a model's components as ONNX graphs.

    python export/export_onnx.py --model MODEL --out DIR [--config PRESET|YAML] [--dtype fp32|fp16|bf16]
                                 [--static HxW,batch] [--components unet vae_decoder ...] [--verify]
                                 [--controlnet FILE [--controlnet FILE2 ...]]

Writes DIR/<component>.onnx for the text encoder, UNet (its batch is the classifier-free-guidance
batch, 2 x images), VAE decoder and VAE encoder. Batch, height and width are dynamic unless --static
is given; graphs over 2 GB keep their weights in DIR/<component>.onnx.data. Each graph passes
onnx.checker and shape inference; --verify also runs it on ONNX Runtime against the torch module.
Without --model, the embedded default model is exported.

--controlnet FILE (a ControlNet file or diffusers folder, repeatable) also writes DIR/unet_control.onnx
(the UNet taking ControlNet residuals) and DIR/controlnet_<name>.onnx per ControlNet, recorded in
DIR/controlnets.json with its weights hash. <name> is what Pipeline.load_controlnet calls the same file:
its stem (a diffusers folder's name), with _2, _3, ... for repeats in the order given; a pipeline with
onnx_dir=DIR finds each loaded ControlNet's graph by that name, so load them in the same order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from ldm_engine.export.graphs import COMPONENTS, DTYPES, Shape

    p = argparse.ArgumentParser(prog="python export/export_onnx.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint file or diffusers folder (default: embedded)")
    p.add_argument("--arch", help="instead of --model: a preset with random weights (sd-1.5, ...)")
    p.add_argument("--config", help="preset name or original YAML for --model (default: detect)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations (default fp32)")
    p.add_argument("--static", type=Shape.parse, default=None, metavar="HxW,BATCH",
                   help="export static graphs for this image size and batch (default: dynamic axes)")
    p.add_argument("--components", nargs="+", choices=COMPONENTS, help="default: every component the model has")
    p.add_argument("--verify", action="store_true", help="run each graph on ONNX Runtime and report max abs error")
    p.add_argument("--controlnet", action="append", type=Path, default=[], metavar="FILE",
                   help="also export this ControlNet's graph and the UNet graph taking its residuals (repeatable)")
    a = p.parse_args(argv)

    from ldm_engine.export.control_graphs import export_control_graphs, load_controlnets
    from ldm_engine.export.onnx_export import export_model
    from ldm_engine.loading import CheckpointError, load_checkpoint, random_model

    try:
        if a.arch:
            if a.model:
                p.error("give --model or --arch, not both")
            model = random_model(a.arch)
            print(f"{a.arch}: random weights")
        else:
            from ldm_engine.defaults import default_model

            model = load_checkpoint(a.model or default_model(), config=a.config)
        controlnets = load_controlnets(model, a.controlnet)  # every file checked before anything is written
        paths = export_model(model, a.out, a.components, a.dtype, a.static)
        if controlnets:
            paths |= export_control_graphs(model, controlnets, a.out, a.dtype, a.static)
    except (CheckpointError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for component, path in paths.items():
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
        line = f"{component:13s} {path}  {size:8.1f} MiB"
        if a.verify:
            from ldm_engine.export.parity import onnx_parity

            kind = "controlnet" if component.startswith("controlnet_") else component
            net = next((c.module for c in controlnets if f"controlnet_{c.name}" == component), None)
            line += f"  max abs vs torch {onnx_parity(model, kind, path, a.static, controlnet=net):.2e}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
