"""TensorRT engines from the exported ONNX graphs.

Everything up to the builder call is plain Python and unit-tested without a GPU: reading a graph's
inputs and metadata, optimization profiles (min/opt/max shapes, the UNet and text encoder sized for
the classifier-free-guidance batch, 2 x images), the precision plan per TensorRT version, the engine
side file (TensorRT version, GPU, shapes, source hash) and its check at load time. `build_engine`
is the thin part that needs tensorrt and a CUDA device.

ControlNets (export/control_graphs.py) have two engines: `unet_control` (the UNet taking the residuals) and
one `controlnet_<name>` per ControlNet, whose side file also records the ControlNet's name and weights
hash (`check_control_engine` refuses another ControlNet under that name). Their profiles cover the CFG
batch (2 x images) and, for the ControlNet, guess mode's conditional half (1 x images) as the minimum.

Precision: TensorRT 11 networks are strongly typed, so an fp16/bf16 engine comes from a graph exported
in that dtype (`export_onnx.py --dtype fp16`); TensorRT 10 can still lower an fp32 graph with a
builder flag.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .cache import file_digest
from .graphs import Shape

ENGINE_SUFFIX = ".plan"
SIDE_SUFFIX = ".json"
# the batch axis of these components carries the CFG pair: prompts and negatives in one call
CFG_COMPONENTS = ("unet", "text_encoder", "unet_control", "controlnet")
# prompts longer than 75 tokens come in chunks: the UNet context grows to 77 x chunks tokens and the text
# encoder sees one row per chunk; profiles cover 1 to this many chunks (77 to 231 tokens)
MAX_PROMPT_CHUNKS = 3


class EngineError(RuntimeError):
    """An engine that cannot be used here (built for another TensorRT, GPU, graph or shape)."""


@dataclass(frozen=True)
class GraphInfo:
    """What build_trt.py needs to know of an exported graph."""

    component: str
    inputs: dict[str, list]  # name -> dims, each an int or a symbolic name ("batch", "height", ...)
    dtype: str  # the dtype it was exported in (fp32 / fp16 / bf16)
    downsampling_factor: int
    context_tokens: int
    source_hash: str  # digest of the graph file (its weights included when stored beside it)
    static_shape: str = "dynamic"  # or the Shape tag a static graph was exported for
    pixel_multiple: int = 8  # image sides must divide by this (autoencoder factor x UNet downsamplings)
    cfg_batch: bool = True  # the UNet / text encoder batch carries the CFG pair (not for LCM-distilled models)


def read_graph(path: str | Path) -> GraphInfo:
    """Inputs, dims and ldm_engine metadata of an exported graph (weights are not loaded)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "ldm_engine.component" not in meta:
        raise EngineError(f"{path} was not exported by ldm_engine (no ldm_engine metadata); export it with "
                          "python export/export_onnx.py")
    inputs = {}
    for inp in proto.graph.input:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in inp.type.tensor_type.shape.dim]
        inputs[inp.name] = dims
    return GraphInfo(meta["ldm_engine.component"], inputs, meta.get("ldm_engine.dtype", "fp32"),
                     int(meta["ldm_engine.downsampling_factor"]), int(meta["ldm_engine.context_tokens"]),
                     file_digest(path, path.with_name(path.name + ".data")), meta.get("ldm_engine.shape", "dynamic"),
                     int(meta.get("ldm_engine.pixel_multiple", meta["ldm_engine.downsampling_factor"])),
                     meta.get("ldm_engine.cfg_batch", "1") != "0")


def input_shape(info: GraphInfo, name: str, shape: Shape, chunks: int = 1, cfg_pair: bool = True) -> tuple[int, ...]:
    """The concrete shape of input `name` for images of `shape` and prompts of `chunks` 77-token
    chunks (symbolic dims filled in); `cfg_pair` False: the batch without the CFG pair (a ControlNet in
    guess mode sees the conditional half only). ControlNet residuals at UNet level k have the axes
    `height/2^k`, `width/2^k`; a ControlNet's hint the image's own `pixel_height`, `pixel_width`."""
    f, m = info.downsampling_factor, info.pixel_multiple
    if shape.height % m or shape.width % m:
        raise ValueError(f"{shape.height}x{shape.width}: image sides must be multiples of {m} for this model")
    pixel = info.component == "vae_encoder"
    pair = 2 if info.component in CFG_COMPONENTS and info.cfg_batch and cfg_pair else 1
    fill = {"batch": shape.batch * pair * (chunks if info.component == "text_encoder" else 1),
            "height": shape.height if pixel else shape.height // f,
            "width": shape.width if pixel else shape.width // f,
            "pixel_height": shape.height, "pixel_width": shape.width,
            "tokens": info.context_tokens * chunks}
    dims = []
    for d in info.inputs[name]:
        if isinstance(d, str):
            axis, _, div = d.partition("/")
            if div.isdigit() and axis in ("height", "width"):  # a residual's axis at a lower UNet level
                dims.append(fill[axis] // int(div))
                continue
            if d not in fill:
                raise EngineError(f"{info.component}: input {name} has an unknown dynamic axis {d!r}")
            dims.append(fill[d])
        else:
            dims.append(int(d))
    return tuple(dims)


def profile_for(info: GraphInfo, lo: Shape, opt: Shape, hi: Shape) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min, opt, max)} for one optimization profile. Checks min <= opt <= max per axis and
    that a static graph is only asked for its own shape. Prompts of 1 chunk at min and opt, up to
    MAX_PROMPT_CHUNKS at max (the UNet context 77 to 231 tokens)."""
    for name, a, b in (("min", lo, opt), ("opt", opt, hi)):
        if a.height > b.height or a.width > b.width or a.batch > b.batch:
            raise ValueError(f"shapes must grow from min to opt to max; {name} {a.tag()} exceeds the next, {b.tag()}")
    if info.static_shape != "dynamic" and any(s.tag() != info.static_shape for s in (lo, opt, hi)):
        h, _, rest = info.static_shape.partition("x")
        w, _, b = rest.partition("b")
        raise ValueError(f"{info.component} was exported with static shapes for {info.static_shape}; build it "
                         f"with --static {h}x{w},{b} (or export dynamic graphs)")
    # guess mode runs a ControlNet on the conditional half of the CFG batch: its minimum has no pair
    lo_pair = info.component != "controlnet"
    return {name: (input_shape(info, name, lo, cfg_pair=lo_pair), input_shape(info, name, opt),
                   input_shape(info, name, hi, MAX_PROMPT_CHUNKS)) for name in info.inputs}


def resolve_shapes(static: Shape | None, lo: Shape | None, opt: Shape | None, hi: Shape | None,
                   default: Shape) -> tuple[Shape, Shape, Shape]:
    """The (min, opt, max) image shapes from the command line: --static alone, or any of --min/--opt/--max
    (a missing --opt is --max, else --min, else `default`; a missing
    --min or --max is --opt)."""
    if static is not None:
        if lo or opt or hi:
            raise ValueError("give --static or --min/--opt/--max, not both")
        return static, static, static
    opt = opt or hi or lo or default
    return lo or opt, opt, hi or opt


def precision_plan(trt_major: int, graph_dtype: str, requested: str) -> str | None:
    """The builder flag to set (TensorRT 10, weakly typed), or None when the graph's own types decide
    (strongly typed: always on TensorRT 11). Refuses what this TensorRT cannot do with this graph."""
    if requested not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {requested!r}")
    if requested == graph_dtype:
        return None
    if graph_dtype != "fp32":
        raise ValueError(f"the graph was exported in {graph_dtype}; it cannot build a {requested} engine")
    if trt_major >= 11:
        raise ValueError(f"TensorRT {trt_major} builds strongly typed networks only: export the graphs with "
                         f"--dtype {requested} for a {requested} engine")
    return requested.upper()  # BuilderFlag.FP16 / BuilderFlag.BF16


def side_file(engine: Path) -> Path:
    return engine.with_suffix(SIDE_SUFFIX)


def engine_record(info: GraphInfo, profile: dict, precision: str, trt_version: str, gpu: str,
                  refit: bool, extra: dict | None = None) -> dict:
    """The side file's contents; `extra`: more to record ({"controlnet": {name, weights_hash}})."""
    return {"component": info.component, "tensorrt": trt_version, "gpu": gpu, "precision": precision,
            "source_hash": info.source_hash, "refit": refit,
            "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()}, **(extra or {})}


def write_record(engine: Path, record: dict) -> None:
    side_file(engine).write_text(json.dumps(record, indent=1, sort_keys=True))


def check_record(engine: Path, trt_version: str, gpu: str, source_hash: str | None = None) -> dict:
    """The engine's side file, after checking that it was built by this TensorRT on this GPU (and from
    this graph, when `source_hash` is given). Raises EngineError naming the mismatch and the fix."""
    path = side_file(engine)
    if not Path(engine).is_file():
        raise EngineError(f"{engine} is missing: build it with python export/build_trt.py")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise EngineError(f"{path} (the engine's side file) is missing or unreadable: rebuild the engine with "
                          "python export/build_trt.py") from None
    problems = []
    if record.get("tensorrt") != trt_version:
        problems.append(f"built by TensorRT {record.get('tensorrt')}, this is {trt_version}")
    if record.get("gpu") != gpu:
        problems.append(f"built for {record.get('gpu')}, this GPU is {gpu}")
    if source_hash is not None and record.get("source_hash") != source_hash:
        problems.append("built from a different ONNX graph")
    if problems:
        raise EngineError(f"{engine}: {'; '.join(problems)}; rebuild it with python export/build_trt.py")
    return record


def check_control_engine(engine_dir: Path, name: str | None, weights: str) -> Path:
    """The engine of the ControlNet the pipeline named `name` (weights hash `weights`) in a folder written
    by build_trt.py --controlnet; EngineError naming the fix when the folder has none (or no unet_control
    engine), or holds another ControlNet's engine under that name."""
    engine_dir = Path(engine_dir)
    fix = f"python export/build_trt.py --onnx DIR --out {engine_dir} --controlnet FILE (DIR from export_onnx.py " \
          "--controlnet FILE)"
    if not (engine_dir / f"unet_control{ENGINE_SUFFIX}").is_file():
        raise EngineError(f"engine_dir {engine_dir} has no unet_control{ENGINE_SUFFIX} (the UNet taking ControlNet "
                          f"residuals); build it with {fix}")
    engine = engine_dir / f"controlnet_{name}{ENGINE_SUFFIX}"
    try:
        record = json.loads(side_file(engine).read_text()) if engine.is_file() else None
    except (OSError, ValueError):
        record = None
    if record is None or "controlnet" not in record:
        raise EngineError(f"engine_dir {engine_dir} has no engine for ControlNet {name!r} ({engine.name} with its "
                          f"side file); build it with {fix}, giving the files in the order the pipeline loads them")
    if record["controlnet"].get("weights_hash") != weights:
        raise EngineError(f"ControlNet {name!r} has other weights ({weights}) than the engine {engine} was built "
                          f"for ({record['controlnet'].get('weights_hash')}); build this one with {fix}")
    return engine


def fits_profile(record: dict, shapes: dict[str, tuple]) -> bool:
    """Whether every input shape lies within the engine's profile."""
    for name, shape in shapes.items():
        lo, _, hi = record["profile"][name]
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
    return True


def build_engine(onnx_path: Path, engine_path: Path, profile: dict, precision: str, info: GraphInfo,
                 timing_cache: Path | None = None, refit: bool = False, workspace_gb: float = 8.0,
                 extra: dict | None = None) -> dict:
    """Build and serialize one engine (needs tensorrt and a CUDA device). Writes the engine through a
    temporary file and its side file last; updates the timing cache. Returns the side-file record
    (with `extra` in it)."""
    import os

    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flag = precision_plan(major, info.dtype, precision)
    flags = 0
    if flag is None and major < 11:  # the graph's types decide; TensorRT 11 is always strongly typed
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if flag is not None:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    if timing_cache:
        tmp = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    record = engine_record(info, profile, precision, trt.__version__, torch.cuda.get_device_name(), refit, extra)
    write_record(engine_path, record)
    return record
