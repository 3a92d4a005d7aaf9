"""Build TensorRT engines from exported ONNX graphs.

    python export/build_trt.py --onnx DIR --out DIR [--fp16 | --bf16]
                               [--min HxW,B] [--opt HxW,B] [--max HxW,B] | [--static HxW,B]
                               [--timing-cache FILE] [--refit] [--components unet ...]
                               [--controlnet FILE [--controlnet FILE2 ...]]

One engine per component found in --onnx (written by export/export_onnx.py), as
DIR/<component>.plan with DIR/<component>.json beside it (TensorRT version, GPU, precision, shape
profile, hash of the source graph), checked when the engine is loaded. Shapes are image sizes and
images per call; the UNet and text encoder profiles are sized for the classifier-free-guidance batch
(2 x images). A missing --opt is --max, else --min, else 512x512,1; a missing --min or --max is --opt.
--controlnet FILE (repeatable) also builds DIR/unet_control.plan and DIR/controlnet_<name>.plan from the
graphs export_onnx.py --controlnet wrote: <name> is the pipeline's name for the file (its stem, _2, _3 ...
for repeats in the order given), and the file must be the one the graph was exported from. Their
profiles cover the CFG batch and guess mode (the ControlNet's minimum batch is 1 x images).
Exits with code 2 and one sentence when tensorrt or a CUDA device is missing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def environment_problem() -> str | None:
    """None when tensorrt and a CUDA device are present; else one sentence saying what is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'ldm_engine[tensorrt]' on a machine with an NVIDIA GPU)."
    try:
        import torch

        if not torch.cuda.is_available():
            return "No CUDA device is visible: TensorRT builds an engine on the GPU that will run it."
    except ImportError:
        return "PyTorch is not installed."
    return None


def parse_args(argv=None):
    from ldm_engine.export.graphs import COMPONENTS, Shape

    p = argparse.ArgumentParser(prog="python export/build_trt.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, required=True, help="folder of <component>.onnx from export_onnx.py")
    p.add_argument("--out", type=Path, required=True, help="folder for the engines")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 engines (TensorRT 11: from --dtype fp16 graphs)")
    prec.add_argument("--bf16", action="store_true", help="bf16 engines (TensorRT 11: from --dtype bf16 graphs)")
    for name in ("min", "opt", "max", "static"):
        p.add_argument(f"--{name}", type=Shape.parse, default=None, metavar="HxW,B")
    p.add_argument("--timing-cache", type=Path, default=None, help="reused and updated across builds")
    p.add_argument("--refit", action="store_true", help="refittable engines (new weights without a rebuild)")
    p.add_argument("--components", nargs="+", choices=COMPONENTS)
    p.add_argument("--controlnet", action="append", type=Path, default=[], metavar="FILE",
                   help="also build the engines of this ControlNet's graph and unet_control (repeatable)")
    a = p.parse_args(argv)
    a.precision = "fp16" if a.fp16 else "bf16" if a.bf16 else "fp32"
    return p, a


def control_graphs(onnx_dir: Path, files) -> list[tuple[str, Path, dict | None]]:
    """[(engine stem, graph, extra side-file record)] of unet_control and each ControlNet file's graph in
    `onnx_dir`, named as the pipeline names the files; ValueError when a graph is missing or was exported
    from another file."""
    from ldm_engine.control.manager import controlnet_name
    from ldm_engine.export.control_graphs import controlnet_file_hash, read_control_index

    fix = f"python export/export_onnx.py --model MODEL --out {onnx_dir} --controlnet FILE [--controlnet FILE2 ...]"
    if not (onnx_dir / "unet_control.onnx").is_file():
        raise ValueError(f"{onnx_dir} has no unet_control.onnx; export the ControlNet graphs with {fix}")
    index = read_control_index(onnx_dir)
    jobs, taken = [("unet_control", onnx_dir / "unet_control.onnx", None)], set()
    for f in files:
        if not f.exists():
            raise ValueError(f"{f}: no such ControlNet file or folder")
        name = controlnet_name(f, taken)
        taken.add(name)
        entry = index.get(name)
        if entry is None:
            raise ValueError(f"{onnx_dir} has no graph for ControlNet {name!r} ({f}); export it with {fix}, giving "
                             "the files in the same order")
        if entry.get("file_hash") != controlnet_file_hash(f):
            raise ValueError(f"{f} is not the file whose graph {onnx_dir} holds as {name!r} (exported from "
                             f"{entry.get('source')}); export it with {fix}")
        jobs.append((f"controlnet_{name}", onnx_dir / entry["graph"],
                     {"controlnet": {"name": name, "weights_hash": entry["weights_hash"], "source": str(f)}}))
    return jobs


def plan(a) -> list[tuple]:
    """[(engine stem, onnx path, GraphInfo, profile, extra side-file record)] for the requested build;
    raises ValueError/EngineError on a bad request. Needs no GPU."""
    from ldm_engine.export.graphs import COMPONENTS, Shape
    from ldm_engine.export.trt_engines import precision_plan, profile_for, read_graph, resolve_shapes

    if not a.onnx.is_dir():
        raise ValueError(f"{a.onnx} is not a folder; export graphs there with python export/export_onnx.py")
    found = [c for c in COMPONENTS if (a.onnx / f"{c}.onnx").is_file()]
    wanted = a.components or found
    missing = [c for c in wanted if c not in found]
    if missing or not wanted:
        raise ValueError(f"{a.onnx} has no {', '.join(missing) or 'graphs'}: export them with python export/export_onnx.py")
    graphs = [(c, a.onnx / f"{c}.onnx", None) for c in wanted]
    if a.controlnet:
        graphs += control_graphs(a.onnx, a.controlnet)
    lo, opt, hi = resolve_shapes(a.static, a.min, a.opt, a.max, Shape(512, 512, 1))
    jobs = []
    for stem, path, extra in graphs:
        info = read_graph(path)
        if info.dtype != "fp32":  # a reduced-precision graph builds only its own precision
            precision_plan(11, info.dtype, a.precision)
        jobs.append((stem, path, info, profile_for(info, lo, opt, hi), extra))
    return jobs


def main(argv=None) -> int:
    p, a = parse_args(argv)
    from ldm_engine.export.trt_engines import ENGINE_SUFFIX, EngineError, build_engine

    try:
        jobs = plan(a)
    except (ValueError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = environment_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    for component, onnx_path, info, profile, extra in tqdm(jobs, desc="engines", unit="engine"):
        try:
            build_engine(onnx_path, a.out / f"{component}{ENGINE_SUFFIX}", profile, a.precision, info,
                         a.timing_cache, a.refit, extra=extra)
        except (ValueError, EngineError) as e:
            print(f"error: {component}: {e}", file=sys.stderr)
            return 1
        print(f"{component}: {a.out / (component + ENGINE_SUFFIX)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
