"""`ldm-generate`: text-to-image (and image-to-image / inpainting) from the command line."""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

EXAMPLES = """examples:
  ldm-generate "a red circle on a blue background"          # the embedded 64x64 shapes model
  ldm-generate "a photo of a cat" --model sd15.safetensors --steps 30 --seed 1 -o cat.png
  ldm-generate "a castle" --model ./sd21-folder --sampler dpmpp_2m_karras --size 768x768 --num 2
  ldm-generate "a dog" --model sd15.safetensors --image in.png --strength 0.6 -o dog.png
  ldm-generate "a stone statue" --model 512-depth-ema.ckpt --image in.png --depth depth.png   # SD 2 depth-to-image
  ldm-generate "a red sofa" --model inpaint.ckpt --image room.png --mask mask.png
  ldm-generate --model bsr_sr.ckpt --image low.png --steps 100 --eta 1 --tile -o x4.png   # LDM 4x super-resolution
  ldm-generate --model semantic_synthesis512.ckpt --label-map labels.png --steps 50  # an image from a label map
  ldm-generate --model inpainting_big.ckpt --image room.png --mask mask.png --steps 50   # the LDM inpainting model
  ldm-generate "a virus monster playing guitar, oil on canvas" --model txt2img-f8-large.ckpt --guidance 5  # LDM BERT
  ldm-generate --model layout2img.ckpt --layout '[[12, [0.1, 0.5, 0.6, 1.0]], [40, [0.5, 0.1, 0.9, 0.5]]]' --steps 200
  ldm-generate "a castle" --model ./lcm-folder --sampler lcm --steps 4 --guidance 8.5   # an LCM-distilled model
  ldm-generate "a castle" --model sd15.safetensors --lora style.safetensors:0.8
  ldm-generate "a house" --model sd15.safetensors --controlnet canny.safetensors --control-image photo.png --canny 100,200
  ldm-generate "a castle <lora:style:0.8>" --model sd15.safetensors --lora-dir loras/
  ldm-generate "a (castle:1.2) in mystyle, BREAK night sky" --model sd15.safetensors --embedding mystyle.pt --clip-skip 2
  ldm-generate --prompts prompts.txt --out shots/ --steps 25       # one PNG per line: shots/00000.png, ...
  ldm-generate --prompts prompts.jsonl --out shots/ --ray --concurrency 2   # on Ray Data workers
"""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (width x height), got {text!r}") from None
    return w, h


def model_hash(path: Path) -> str:
    """Short sha256 of the weights file (or of a folder's model_index.json), for the PNG parameters."""
    target = path / "model_index.json" if path.is_dir() else path
    h = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def parser() -> argparse.ArgumentParser:
    from .sampling import SAMPLERS

    p = argparse.ArgumentParser(prog="ldm-generate", description="Generate images with a latent diffusion model.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="", help="what to draw")
    p.add_argument("--model", type=Path, default=None,
                   help="a single-file checkpoint or a diffusers folder (default: the embedded shapes model)")
    p.add_argument("--config", help="preset name (sd-1.5, sd-2.1-v, ...) or original YAML; default: detect")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; 20 for the embedded model)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="sampler (default: a diffusers folder's own scheduler, else ddim)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's, 7.5; 1 = none for the LDM BERT models, "
                        "as diffusers; 4 for the embedded model)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM's eta (default 0, deterministic; the LDM super-resolution notebook samples with 1) or "
                        "TCD's gamma (default 0.3)")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="DeepCache step-feature caching: the whole UNet every N-th step, its shallow part between "
                        "(default: off; 3 is about 2x faster on SD at a small cost in detail)")
    p.add_argument("--cache-branch", type=int, default=0, metavar="K",
                   help="with --cache-interval: how deep the shallow part reaches (default 0, the shallowest and "
                        "fastest; larger keeps more detail)")
    p.add_argument("--cache-schedule", default="uniform", choices=["uniform", "non-uniform"],
                   help="with --cache-interval: full steps evenly spaced (default) or denser around step 15")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--image", type=Path, help="input image: img2img, or inpainting with --mask")
    p.add_argument("--mask", type=Path, help="inpainting mask (white = repaint)")
    p.add_argument("--depth", type=Path, default=None, metavar="IMG",
                   help="depth map for depth-to-image models (white = near; 16-bit PNGs keep their precision): "
                        "img2img with --image, else generated from noise with this structure")
    p.add_argument("--label-map", type=Path, default=None, metavar="IMG",
                   help="label map for semantic synthesis models: a single-channel PNG, one class id per pixel, at "
                        "the output size")
    p.add_argument("--tile", type=_tile, nargs="?", const=True, default=None, metavar="SIDE,STRIDE",
                   help="models conditioned by concatenation (LDM super-resolution, semantic synthesis, LDM "
                        "inpainting): sample in overlapping latent patches (default 128,64 as the original; without "
                        "--tile the whole latent at once, convolutionally)")
    p.add_argument("--layout", type=_layout, default=None, metavar="JSON",
                   help='layout-to-image models: the objects as JSON, [["Person", [x0, y0, x1, y1]], [3, [...]], ...] '
                        "with coordinates in [0, 1] and a class number or a name from --class-names; or a .json file")
    p.add_argument("--class-names", type=Path, default=None, metavar="FILE",
                   help="the layout model's class names, one per line (line i names class i), for names in --layout")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="tokenizer files other than the model's own, e.g. the BERT vocab.txt of the LDM text-to-image "
                        "models (default: a diffusers folder's tokenizer/, else the vocabulary a dependency ships)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting strength in [0, 1] (default 0.8; 1.0 for 9-channel inpainting models)")
    p.add_argument("--class-label", type=int, default=None, help="class for class-conditional models")
    p.add_argument("--num", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="output PNG (numbered when --num > 1)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "openvino", "tensorrt"],
                   help="runtime (default torch; the graph backends export on first use into the artifact cache)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "int8"],
                   help="precision (default: the backend's own: fp32 for torch and onnxruntime, bf16 for openvino "
                        "where the CPU has it, fp16 for tensorrt); int8: openvino with NNCF-quantized graphs")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="A1111's clip skip: 1 = the text encoder's own output layer, 2 = one layer earlier, ...")
    p.add_argument("--prompt-syntax", default="a1111", choices=["a1111", "plain"],
                   help="a1111 (default): (word) [word] (word:1.5) weights and BREAK; plain: brackets are text")
    p.add_argument("--embedding", type=Path, action="append", default=[], metavar="FILE",
                   help="textual-inversion file to load (repeatable); its trigger is the file stem (A1111 files) or "
                        "its token (diffusers learned_embeds)")
    p.add_argument("--embedding-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of textual-inversion files, each used when its file stem appears in a prompt "
                        "(repeatable)")
    p.add_argument("--lora", type=_lora, action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA / LyCORIS file merged into the model at SCALE (default 1; repeatable)")
    p.add_argument("--lora-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of LoRA files for <lora:NAME:WEIGHT> prompt tags (repeatable)")
    p.add_argument("--controlnet", type=Path, action="append", default=[], metavar="FILE",
                   help="ControlNet file or diffusers folder (repeatable; one --control-image each, in order)")
    p.add_argument("--control-image", type=Path, action="append", default=[], metavar="IMG",
                   help="control image for the ControlNet of the same position (stretched to the output size)")
    p.add_argument("--control-scale", type=float, action="append", default=[], metavar="S",
                   help="ControlNet weight (default 1; one value for all or one per ControlNet)")
    p.add_argument("--canny", type=_thresholds, default=None, metavar="LOW,HIGH",
                   help="turn the control images into Canny edge maps first (e.g. 100,200; needs OpenCV)")
    batch = p.add_argument_group("batch generation (a prompts file -> one PNG per prompt; resumes where it stopped)")
    batch.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                       help=".txt (one prompt per line, # comments) or .jsonl (one object per line: prompt and Pipeline "
                            "arguments such as seed, steps, guidance_scale, sampler, width, height); the options "
                            "above are every line's defaults; seed: the line's, else --seed (default 0) + index")
    batch.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="folder for the PNGs: the i-th prompt -> DIR/{i:05d}.png; existing PNGs are skipped")
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray Data: the Ray this process joined, else ADDRESS, else RAY_ADDRESS, else a "
                            "cluster `ray start` began here, else a new local instance")
    batch.add_argument("--concurrency", type=int, default=None, metavar="N",
                       help="Ray workers, each loading the model once (default: the cluster's CPUs / --cpus-per-worker)")
    batch.add_argument("--batch-size", type=int, default=None, metavar="B",
                       help="prompts per Ray task, each still rendered alone (default 4)")
    batch.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                       help="CPUs Ray reserves for each worker (default 1)")
    batch.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads per worker (default: this process's); the same count on the same CPU kind "
                            "gives the same pixels with and without --ray")
    return p


def _lora(text: str) -> tuple[Path, float]:
    """FILE[:SCALE] -> (file, scale); a colon not followed by a number belongs to the file name."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def _layout(text: str):
    """--layout: JSON text, or the path of a .json file holding it."""
    import json

    source = Path(text)
    try:
        if text.endswith(".json") and source.is_file():
            text = source.read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"--layout takes JSON such as '[[\"Person\", [0.1, 0.2, 0.5, 0.9]]]' or a "
                                         f".json file; got {text[:80]!r} ({e})") from None


def _tile(text: str) -> tuple[int, int]:
    try:
        side, stride = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile takes SIDE,STRIDE in latent pixels such as 128,64, "
                                         f"got {text!r}") from None
    return side, stride


def _thresholds(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--canny takes LOW,HIGH thresholds such as 100,200, got {text!r}") from None
    return low, high


def _control(pipe, args) -> tuple[dict, dict]:
    """Load the --controlnet files and make their control images -> (pipeline arguments, PNG entries)."""
    from .control.params import controlnet_entries
    from .control.preprocess import preprocess

    if len(args.control_image) != len(args.controlnet):
        raise ValueError(f"{len(args.controlnet)} --controlnet but {len(args.control_image)} --control-image; "
                         "give one control image per ControlNet")
    if not args.controlnet:
        if args.canny or args.control_scale:
            raise ValueError("--canny and --control-scale need --controlnet FILE --control-image IMG")
        return {}, {}
    for file in args.controlnet:
        pipe.load_controlnet(file)
    module = "canny" if args.canny else "none"
    options = dict(zip(("low", "high"), args.canny)) if args.canny else {}
    try:
        images = [preprocess(img, module, **options) for img in args.control_image]
    except ImportError as e:  # OpenCV missing: one sentence, not a traceback
        raise RuntimeError(str(e)) from None
    n = len(images)
    scales = args.control_scale or [1.0]
    scales = scales * n if len(scales) == 1 else scales
    kwargs = dict(control_image=images, controlnet_conditioning_scale=scales)
    return kwargs, controlnet_entries(pipe.control.loaded, [module] * n, scales, [0.0] * n, [1.0] * n,
                                      [args.canny] * n)


def ti_hashes(embeddings) -> str:
    """A1111's "TI hashes" entry: name: hash, ... (names without ':' and ',')."""
    return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.hash}" for e in embeddings)


def a1111_parameters(params: dict, args, out) -> str:
    """The `parameters` chunk in A1111's infotext form (what A1111's PNG Info tab and civitai read)."""
    from . import __version__
    from .infotext import A1111_SAMPLER_NAMES, infotext

    model = args.model.stem if args.model.is_file() else args.model.name
    strength = args.strength if args.image is not None else None
    return infotext(params["prompt"], params["negative"], {
        "Steps": args.steps, "Sampler": A1111_SAMPLER_NAMES.get(args.sampler, args.sampler),
        "CFG scale": f"{args.guidance:g}", "Seed": out.seed, "Size": params["size"], "Model hash": params["model_hash"],
        "Model": model, "Denoising strength": strength, "Clip skip": params.get("Clip skip"),
        "Lora hashes": params.get("Lora hashes"), "TI hashes": params.get("TI hashes"),
        **{k: v for k, v in params.items() if k.startswith("ControlNet ")}, "Depth map": params.get("Depth map"),
        "Label map": params.get("Label map"), "Tile": params.get("Tile"), "Eta": args.eta,
        "Layout": params.get("Layout"), "Class names": params.get("Class names"),
        **_cache_fields(args),
        "Version": f"ldm_engine {__version__}"})


def _cache_fields(args) -> dict:
    """The step cache's settings for the PNG parameters (none when it was off or the run has no such option)."""
    interval = getattr(args, "cache_interval", None)
    if interval is None:
        return {}
    return {"Cache interval": interval, "Cache branch": args.cache_branch, "Cache schedule": args.cache_schedule}


def _dtype(name: str | None):
    from .export.graphs import DTYPES

    return "int8" if name == "int8" else DTYPES.get(name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .serve.batch_job import BATCH_OPTIONS, main_from_cli

    if args.prompts is not None or any(getattr(args, k) is not None for k in BATCH_OPTIONS):
        return main_from_cli(args)  # a prompts file -> a folder of PNGs, here or on Ray
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from . import CheckpointError, Pipeline
    from .defaults import default_model
    from .adapters import hashes_text as lora_hashes
    from .images import save_png

    embedded = args.model is None
    args.steps = args.steps if args.steps is not None else (20 if embedded else 30)
    try:
        args.model = args.model or default_model()
        pipe = Pipeline.from_pretrained(args.model, config=args.config, backend=args.backend,
                                        dtype=_dtype(args.dtype), device=args.device, prompt_syntax=args.prompt_syntax,
                                        clip_skip=args.clip_skip, embedding_dirs=args.embedding_dir or None,
                                        lora_dirs=args.lora_dir or None, tokenizer=args.tokenizer)
        # the model's own default guidance: 7.5 (Stable Diffusion), 1 for the LDM BERT models (as diffusers)
        args.guidance = (args.guidance if args.guidance is not None
                         else 4.0 if embedded else pipe.config.guidance_scale)
        for embedding in args.embedding:
            pipe.load_textual_inversion(embedding)
        lora_tags = "".join(f"<lora:{pipe.load_lora(file, scale)}:{scale:g}>" for file, scale in args.lora)
        control_kwargs, control_params = _control(pipe, args)
        args.sampler = args.sampler or pipe.config.default_sampler
        w, h = args.size or (None, None)
        out = pipe(args.prompt or None, negative_prompt=args.negative, height=h, width=w,
                   num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                   seed=args.seed, num_images_per_prompt=args.num, image=args.image, mask_image=args.mask,
                   strength=args.strength, class_label=args.class_label, depth_map=args.depth, label_map=args.label_map,
                   tile=args.tile or False, eta=args.eta, layout=args.layout, class_names=args.class_names,
                   cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                   cache_schedule=args.cache_schedule, **control_kwargs)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"ldm-generate: error: {e}", file=sys.stderr)
        return 2
    params = {"prompt": args.prompt, "negative": args.negative or "", "steps": args.steps, "sampler": args.sampler,
              "guidance": args.guidance, "seed": out.seed, "size": f"{out.images[0].width}x{out.images[0].height}",
              "model": args.model.name, "model_hash": model_hash(args.model)}
    params.update(control_params)
    if args.depth is not None:
        params["Depth map"] = f"{args.depth.name} [{model_hash(args.depth)}]"
    if args.label_map is not None:
        params["Label map"] = f"{args.label_map.name} [{model_hash(args.label_map)}]"
    if args.layout is not None:  # the objects as given (JSON), and the names file they were looked up in
        from .conditioning.layout import layout_text

        params["Layout"] = layout_text(args.layout)
        if args.class_names is not None:
            params["Class names"] = f"{args.class_names.name} [{model_hash(args.class_names)}]"
    if args.tile:
        from .conditioning.patches import resolve_tile

        params["Tile"] = "{},{}".format(*resolve_tile(args.tile, pipe.config))  # patch side, stride (latent pixels)
    if args.clip_skip is not None and args.clip_skip > 1:  # A1111 writes it from 2 on
        params["Clip skip"] = args.clip_skip
    if pipe.prompts is not None and (used := pipe.prompts.used_embeddings([args.prompt, args.negative or ""])):
        params["TI hashes"] = ti_hashes(used)
    if loras := pipe.loras + pipe.adapters.last_call:  # A1111: hashes in "Lora hashes", weights as prompt tags
        params["prompt"] = args.prompt + lora_tags  # as A1111 records a LoRA it adds to every prompt
        params["Lora hashes"] = lora_hashes(loras)
    text = a1111_parameters(params, args, out)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(out.images):
        path = args.output if len(out.images) == 1 else args.output.with_name(f"{args.output.stem}-{i}{args.output.suffix}")
        save_png(image, path, params, text)
        print(f"wrote {path} (seed {out.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
