"""Batch generation: a prompts file -> one PNG per prompt, in this process or on a Ray cluster (Ray Data).

    ldm-generate --prompts prompts.txt --out shots/                   # one Pipeline here
    ldm-generate --prompts prompts.jsonl --out shots/ --ray           # Ray Data workers (local or RAY_ADDRESS)
    ldm-generate --prompts prompts.jsonl --out shots/ --ray ray://head:10001 --concurrency 8

A prompts file is `.txt` (one prompt per line) or `.jsonl` (one object of Pipeline arguments per line; see
prompts_file.py). The ldm-generate options are every line's defaults.

The i-th prompt (0-based, comments and blank lines not counted) becomes `OUT/{i:05d}.png` with seed
`line's seed`, else `--seed + i` (--seed defaults to 0): the same file gives the same images on every
run, locally or on Ray. A run skips the PNGs already in OUT, so an interrupted job resumes; files are
written whole (temp file + rename), each with the `parameters` chunk ldm-generate writes.

On Ray, `map_batches` runs a callable class (`ImageGenerator`) on `concurrency` actors: each loads the
model once, renders its rows one at a time (batch 1, as locally) to PNG bytes, and the driver writes
the files as results stream back, so workers may sit on other nodes. Pixels match a local run when the
torch thread count (`--threads`, default: this process's) and the CPU kind match.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .prompts_file import IMAGE_KEYS, BatchError, Item, read_prompts, with_defaults

__all__ = ["BatchError", "Item", "ImageGenerator", "ModelSpec", "read_prompts", "with_defaults", "load_pipeline",
           "render", "run", "run_local", "run_ray", "main_from_cli"]


# ---- one worker: load once, render rows ------------------------------------------------------------------

@dataclass
class ModelSpec:
    """How every worker builds its Pipeline (plain values: it travels to Ray actors)."""
    model: str
    model_hash: str
    threads: int  # torch intra-op threads; equal counts on the same CPU kind give equal pixels
    config: str | None = None
    backend: str = "torch"
    dtype: str | None = None
    device: str = "cpu"
    prompt_syntax: str = "a1111"
    clip_skip: int | None = None
    embeddings: list[str] = field(default_factory=list)
    embedding_dirs: list[str] = field(default_factory=list)
    loras: list[tuple[str, float]] = field(default_factory=list)
    lora_dirs: list[str] = field(default_factory=list)


def load_pipeline(spec: ModelSpec):
    """-> (Pipeline, the <lora:...> tags that record the --lora files in each prompt)."""
    import torch

    from ..cli import _dtype
    from ..pipeline import Pipeline

    torch.set_num_threads(spec.threads)
    pipe = Pipeline.from_pretrained(spec.model, config=spec.config, backend=spec.backend, dtype=_dtype(spec.dtype),
                                    device=spec.device, prompt_syntax=spec.prompt_syntax, clip_skip=spec.clip_skip,
                                    embedding_dirs=spec.embedding_dirs or None, lora_dirs=spec.lora_dirs or None)
    for embedding in spec.embeddings:
        pipe.load_textual_inversion(embedding)
    tags = "".join(f"<lora:{pipe.load_lora(file, scale)}:{scale:g}>" for file, scale in spec.loras)
    return pipe, tags


def render(pipe, spec: ModelSpec, lora_tags: str, args: dict, inputs: dict[str, bytes]) -> bytes:
    """One prompt alone (batch 1) -> PNG bytes with the same text chunks as ldm-generate's files."""
    from PIL import Image

    from ..adapters import hashes_text as lora_hashes
    from ..cli import a1111_parameters, ti_hashes
    from ..images import save_png

    call = {k: v for k, v in args.items() if k not in IMAGE_KEYS}
    call.update({k: Image.open(io.BytesIO(data)) for k, data in inputs.items() if data})
    call["sampler"] = call.get("sampler") or pipe.config.default_sampler
    if call.get("guidance_scale") is None:
        call["guidance_scale"] = pipe.config.guidance_scale
    out = pipe(**call, progress=False)
    prompt, negative = call.get("prompt", ""), call.get("negative_prompt") or ""
    steps, guidance = call["num_inference_steps"], call["guidance_scale"]
    params = {"prompt": prompt, "negative": negative, "steps": steps, "sampler": call["sampler"], "guidance": guidance,
              "seed": out.seed, "size": f"{out.images[0].width}x{out.images[0].height}",
              "model": Path(spec.model).name, "model_hash": spec.model_hash}
    clip_skip = call.get("clip_skip", spec.clip_skip)
    if clip_skip is not None and clip_skip > 1:  # A1111 writes it from 2 on
        params["Clip skip"] = clip_skip
    if pipe.prompts is not None and (used := pipe.prompts.used_embeddings([prompt, negative])):
        params["TI hashes"] = ti_hashes(used)
    if loras := pipe.loras + pipe.adapters.last_call:
        params["prompt"] = prompt + lora_tags
        params["Lora hashes"] = lora_hashes(loras)
    # the fields of an ldm-generate run that a1111_parameters reads
    run = SimpleNamespace(model=Path(spec.model), steps=steps, sampler=call["sampler"], guidance=guidance,
                          strength=call.get("strength"), image=args.get("image"), eta=call.get("eta"))
    buf = io.BytesIO()
    save_png(out.images[0], buf, params, a1111_parameters(params, run, out))
    return buf.getvalue()


def _render_item(pipe, spec, tags, item: Item, inputs) -> bytes:
    try:
        return render(pipe, spec, tags, item.args, inputs)
    except (ValueError, RuntimeError, OSError) as e:
        raise BatchError(f"line {item.line} ({item.name}): {e}") from e


class ImageGenerator:
    """Ray Data callable class: loads the Pipeline once per actor; a batch of rows -> PNG bytes per row.

    In: index, line, args (JSON), image, mask_image (file bytes, b"" when absent). Out: name, png, error
    (a message instead of raising, so the driver reports it in one sentence)."""

    def __init__(self, spec: dict):
        self.spec = ModelSpec(**spec)
        self.error = ""
        try:
            self.pipe, self.tags = load_pipeline(self.spec)
        except (ValueError, RuntimeError, OSError) as e:  # reported with the first row
            self.error = str(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, pngs, errors = [], [], []
        for i in range(len(batch["index"])):
            item = Item(int(batch["index"][i]), int(batch["line"][i]), json.loads(str(batch["args"][i])))
            inputs = {k: bytes(batch[k][i]) for k in IMAGE_KEYS}
            png, error = b"", self.error
            if not error:
                try:
                    png = _render_item(self.pipe, self.spec, self.tags, item, inputs)
                except BatchError as e:
                    error = str(e)
            names.append(item.name)
            pngs.append(png)
            errors.append(error)
        return {"name": np.array(names), "png": np.array(pngs, dtype=object), "error": np.array(errors)}


# ---- the driver: plan, skip, write ---------------------------------------------------------------------

def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename: `path` is whole or absent, never half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _inputs(item: Item) -> dict[str, bytes]:
    return {k: Path(item.args[k]).read_bytes() if item.args.get(k) else b"" for k in IMAGE_KEYS}


def run_local(spec: ModelSpec, todo: list[Item], out_dir: Path, bar) -> None:
    pipe, tags = load_pipeline(spec)
    for item in todo:
        write_atomic(out_dir / item.name, _render_item(pipe, spec, tags, item, _inputs(item)))
        bar.update(1)


def connect_ray(address: str | None) -> bool:
    """Use the Ray this process already joined, else join `address` (or RAY_ADDRESS, or a cluster started
    on this machine), else start a local one. True when this call did ray.init (the caller shuts it down)."""
    import ray

    from .ray_env import init_ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    try:
        init_ray(address, configure_logging=False, log_to_driver=False)
    except ConnectionError as e:
        raise BatchError(f"could not connect to Ray at {address!r}: {e}") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in a second on a wrong HOST:PORT (ray.init retries an unreachable one for minutes)."""
    import socket

    host, sep, port = address.split("://")[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise BatchError(f"Ray address must look like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise BatchError(f"no Ray cluster answers at {address!r} ({e.strerror or e}); start one with "
                         "`ray start --head`, or leave out the address to run a local one") from None


def _quiet_progress(record: logging.LogRecord) -> bool:
    return "Progress bars disabled" not in record.getMessage()


def run_ray(spec: ModelSpec, todo: list[Item], out_dir: Path, bar, address: str | None = None,
            concurrency: int | None = None, batch_size: int = 4, num_cpus: float = 1.0) -> None:
    """`concurrency` actors (default: the cluster's CPUs / num_cpus, at most one per batch) of `num_cpus`
    CPUs each (and one GPU each when the device is CUDA) render `batch_size` rows per call."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RuntimeError(f"--ray needs Ray Data ({e}); install it with: pip install 'ldm_engine[serve]'") from None
    started = connect_ray(address)
    # the driver's bar counts images: Ray Data's own bars, its note that they are off and its INFO lines are noise
    ctx, data_log, progress_log = (ray.data.DataContext.get_current(), logging.getLogger("ray.data"),
                                   logging.getLogger("ray.data._internal.progress"))
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, data_log.level
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    data_log.setLevel(max(data_log.getEffectiveLevel(), logging.WARNING))
    progress_log.addFilter(_quiet_progress)
    try:
        rows = [{"index": it.index, "line": it.line, "args": json.dumps(it.args), **_inputs(it)} for it in todo]
        blocks = math.ceil(len(rows) / batch_size)
        gpus = {"num_gpus": 1} if spec.device.startswith("cuda") else {}  # one GPU per worker
        if concurrency is None:
            fit = ray.cluster_resources().get("GPU", 0) if gpus else ray.cluster_resources().get("CPU", 1) // num_cpus
            concurrency = max(1, min(blocks, int(fit)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            ImageGenerator, fn_constructor_kwargs={"spec": asdict(spec)},
            compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size, batch_format="numpy",
            num_cpus=num_cpus, **gpus)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # streams as workers finish
            for name, png, error in zip(batch["name"], batch["png"], batch["error"]):
                if error:
                    raise BatchError(str(error))
                write_atomic(out_dir / str(name), bytes(png))
                bar.update(1)
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, level = saved
        data_log.setLevel(level)
        progress_log.removeFilter(_quiet_progress)
        if started:
            ray.shutdown()


def run(items: list[Item], out_dir, spec: ModelSpec, ray: bool = False, address: str | None = None,
        concurrency: int | None = None, batch_size: int = 4, num_cpus: float = 1.0) -> tuple[int, int]:
    """Generate every item (see read_prompts, with_defaults) whose PNG is not yet in `out_dir`, here or on
    Ray -> (written, skipped)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchError(f"--out {str(out_dir)!r} is a file; give a folder for the numbered PNGs")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not (out_dir / it.name).is_file()]
    skipped = len(items) - len(todo)
    if skipped:
        print(f"skipping {skipped} of {len(items)} images already in {out_dir}")
    if todo:
        with tqdm(total=len(todo), desc="images", unit="img", file=sys.stderr) as bar:
            if ray:
                run_ray(spec, todo, out_dir, bar, address, concurrency, batch_size, num_cpus)
            else:
                run_local(spec, todo, out_dir, bar)
    return len(todo), skipped


# ---- ldm-generate --prompts FILE --out DIR -------------------------------------------------------------

BATCH_OPTIONS = ("out", "ray", "concurrency", "batch_size", "cpus_per_worker", "threads")


def _check_cli(args) -> None:
    given = [f"--{k.replace('_', '-')}" for k in BATCH_OPTIONS if getattr(args, k) is not None]
    if args.prompts is None:
        raise BatchError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --prompts FILE (a batch "
                         "job); for one image give a prompt")
    if args.prompt:
        raise BatchError("give a prompt or --prompts FILE, not both")
    if args.out is None:
        raise BatchError("--prompts needs --out DIR, the folder for the numbered PNGs")
    if args.ray is None and (args.concurrency is not None or args.batch_size is not None
                             or args.cpus_per_worker is not None):
        raise BatchError("--concurrency, --batch-size and --cpus-per-worker need --ray")
    if args.output != Path("out.png"):
        raise BatchError("-o names one image; a batch job writes OUT/00000.png, ... into --out DIR")
    if args.num != 1:
        raise BatchError(f"--num {args.num} does not apply to --prompts: one image per line; repeat a line with "
                         "other seeds for more")
    if args.controlnet or args.control_image or args.control_scale or args.canny:
        raise BatchError("ControlNet options do not apply to --prompts; run ControlNet images one at a time")
    for flag in ("depth", "label_map", "layout", "class_names", "tile", "tokenizer"):
        if getattr(args, flag, None) is not None:
            raise BatchError(f"--{flag.replace('_', '-')} does not apply to --prompts; run the models that take it "
                             "one image at a time")
    if getattr(args, "cache_interval", None) is not None:
        raise BatchError("--cache-interval does not apply to --prompts; run cached generations one at a time")
    for name, value, low in (("--concurrency", args.concurrency, 1), ("--batch-size", args.batch_size, 1),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise BatchError(f"{name} must be >= {low}, got {value}")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise BatchError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    for flag, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise BatchError(f"{flag} file {str(path)!r} does not exist")


def main_from_cli(args) -> int:
    """`ldm-generate --prompts FILE --out DIR [--ray [ADDRESS]] ...`: the parsed options -> exit code."""
    import torch

    from ..cli import model_hash
    from ..defaults import default_model

    try:
        _check_cli(args)
        embedded = args.model is None
        model = args.model or default_model()
        if not model.exists():
            raise BatchError(f"--model {str(model)!r}: no such file or folder")
        w, h = args.size or (None, None)
        steps = args.steps if args.steps is not None else (20 if embedded else 30)
        defaults = {"negative_prompt": args.negative, "num_inference_steps": steps,
                    # None: each model's own default (7.5; 1 for the LDM BERT models), read once the model is loaded
                    "guidance_scale": args.guidance if args.guidance is not None else (4.0 if embedded else None),
                    "sampler": args.sampler, "width": w, "height": h, "strength": args.strength,
                    "image": str(args.image) if args.image else None, "mask_image": str(args.mask) if args.mask else None,
                    "class_label": args.class_label, "eta": args.eta}
        items = with_defaults(read_prompts(args.prompts), defaults, args.seed or 0)  # before hashing the model
        spec = ModelSpec(str(model), model_hash(model), args.threads or torch.get_num_threads(), args.config,
                         args.backend, args.dtype, args.device, args.prompt_syntax, args.clip_skip,
                         [str(p) for p in args.embedding], [str(p) for p in args.embedding_dir],
                         [(str(p), s) for p, s in args.lora], [str(p) for p in args.lora_dir])
        written, skipped = run(items, args.out, spec, args.ray is not None, args.ray or None, args.concurrency,
                               args.batch_size or 4, args.cpus_per_worker or 1.0)
    except (ValueError, RuntimeError, OSError) as e:  # CheckpointError and BatchError are ValueErrors
        print(f"ldm-generate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} images to {args.out}" + (f" ({skipped} already there)" if skipped else ""))
    return 0
