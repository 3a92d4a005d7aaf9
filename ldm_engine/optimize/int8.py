"""int8 for the OpenVINO backend (`dtype="int8"`): post-training quantization with NNCF.

UNet: W8A8 — the convolutions and the linear layers get int8 weights (per channel, symmetric) and int8
activations (asymmetric, ranges calibrated), so OpenVINO runs them as int8 GEMMs (VNNI / AMX where the
CPU has them). Kept in floating point (bf16 where the CPU has it, else f32), because small errors there
move every output pixel or because they cost nothing:
  - the time embedding MLP, the per-block timestep projections (`emb_layers`), class / guidance
    embeddings: they condition every block, and are a few small GEMVs;
  - attention's activation-by-activation products (Q·Kᵀ and softmax·V): their operands have no fixed
    range across prompts and steps, and quantizing the softmax input is what breaks attention;
  - the first and the last convolution (latent in, model output out).
Calibration uses the UNet inputs the model itself produces: the fp32 OpenVINO pipeline samples a fixed,
built-in prompt set (CALIBRATION_PROMPTS, fixed seeds, a few DDIM steps at a small size) and every UNet
call's (sample, timestep, context) is kept. Text encoder and VAE: weight-only int8 (INT8_ASYM), no
calibration. Results go to the artifact cache keyed by the source graph and every calibration setting,
so a second load finds them.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECIPE = "w8a8-unet_wc-rest_v1"  # bump when the recipe changes: it is part of every int8 cache key
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse", "a red vintage car parked on a rainy street at night",
    "a bowl of fruit on a wooden table, oil painting", "portrait of an old fisherman, dramatic lighting",
    "a snowy mountain range under a clear blue sky", "a cute corgi wearing sunglasses on the beach",
    "an isometric illustration of a tiny city", "a watercolor of a lighthouse in a storm",
)
# names of the layers kept in floating point (ONNX node names of this package's export: /unet/<module path>/...)
KEEP_FLOAT = (r".*(time_embed|emb_layers|label_emb|time_cond_proj|cond_proj).*",
              r".*/input_blocks\.0/.*", r".*/out/out\.2/.*")


@dataclass(frozen=True)
class Calibration:
    """What the UNet's calibration set is made of (all of it enters the cache key)."""
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS
    steps: int = 4
    guidance: float = 7.5
    size: int | None = None  # None: the model's native size, at most 256 (ranges barely depend on it)
    seed: int = 0

    def pixel_size(self, model) -> int:
        from ..export.graphs import pixel_multiple

        m = pixel_multiple(model)
        side = self.size or min(model.config.image_size, 256)
        return max(m, side // m * m)


def require_nncf():
    try:
        import nncf
    except ImportError:
        raise RuntimeError("dtype='int8' quantizes with NNCF: pip install 'ldm_engine[int8]'") from None
    import logging

    nncf.set_log_level(logging.WARNING)  # its INFO lists every kept layer by name
    return nncf


def int8_key(source_key: str, component: str, calibration: Calibration | None) -> str:
    """The cache key of a component's int8 model: its source graph's key, the recipe, NNCF's version and
    (for the UNet) the calibration settings."""
    import hashlib
    import json

    nncf = require_nncf()
    settings = {"source": source_key, "recipe": RECIPE, "nncf": nncf.__version__,
                "calibration": dataclasses.asdict(calibration) if calibration is not None else None}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"{component}-{digest}-int8"


def activation_matmuls(ov_model) -> list[str]:
    """MatMuls whose two operands are both activations (attention's Q·Kᵀ and softmax·V): neither input
    is a constant (through the Convert / reshape nodes a weight may pass)."""
    def constant(output) -> bool:
        node = output.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze", "Multiply", "Subtract"):
            if node.get_type_name() in ("Multiply", "Subtract"):  # a decompression subgraph: weight * scale
                return all(constant(i.get_source_output()) for i in node.inputs())
            node = node.input(0).get_source_output().get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in ov_model.get_ops() if op.get_type_name() == "MatMul"
            and not any(constant(i.get_source_output()) for i in op.inputs())]


def quantize_unet(ov_model, feeds: list[dict[str, np.ndarray]]):
    """The UNet's OpenVINO model with int8 convolutions and linear layers, calibrated on `feeds`."""
    nncf = require_nncf()
    keep = nncf.IgnoredScope(names=activation_matmuls(ov_model), patterns=list(KEEP_FLOAT), validate=False)
    return nncf.quantize(ov_model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.MIXED,
                         model_type=nncf.ModelType.TRANSFORMER, ignored_scope=keep, subset_size=len(feeds),
                         fast_bias_correction=True)


def compress_weights(ov_model):
    """Weight-only int8 (per output channel, asymmetric): the text encoder and the VAE."""
    nncf = require_nncf()
    return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def calibration_feeds(model, calibration: Calibration, progress: bool = True) -> list[dict[str, np.ndarray]]:
    """The UNet graph inputs of every UNet call while the fp32 OpenVINO pipeline samples the calibration
    prompts (one feed per call, the CFG batch in each)."""
    import torch
    from tqdm.auto import tqdm

    from ..backends.openvino_backend import OpenVINOBackend
    from ..pipeline import Pipeline

    backend = OpenVINOBackend(model, dtype=torch.float32, progress=progress)
    pipe = Pipeline(model, backend)
    feeds: list[dict[str, np.ndarray]] = []
    run_unet = backend.denoise

    def recording(z, t, context, extra=None):
        feeds.append({k: np.array(v) for k, v in backend._unet_feeds(z, t, context, extra or {}).items()})
        return run_unet(z, t, context, extra)

    backend.denoise = recording
    side = calibration.pixel_size(model)
    prompts = list(calibration.prompts) if model.text_encoder is not None else [None] * len(calibration.prompts)
    bar = tqdm(prompts, desc="int8 calibration", unit="prompt", disable=not progress)
    for i, prompt in enumerate(bar):
        kw = {"guidance_scale": calibration.guidance} if prompt is not None else {}
        pipe(prompt, num_inference_steps=calibration.steps, height=side, width=side, seed=calibration.seed + i,
             sampler="ddim", output_type="latent", progress=False, **kw)
    return feeds


def int8_model(core, path: Path, component: str, source_key: str, model, cache, progress: bool = True):
    """The int8 OpenVINO model of `component` (graph at `path`), from the artifact cache or made now."""
    import openvino as ov

    calibration = Calibration() if component == "unet" else None

    def build(folder: Path) -> dict:
        import contextlib
        import sys

        source = core.read_model(str(path))
        # NNCF draws its progress on stdout; it goes with the other progress bars to stderr, so that a
        # command's stdout (ldm-bench rows, --evaluate's JSON) stays its own
        with contextlib.redirect_stdout(sys.stderr):
            if component == "unet":
                feeds = calibration_feeds(model, calibration, progress)
                quantized = quantize_unet(source, feeds)
            else:
                quantized = compress_weights(source)
        ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
        return {"component": component, "recipe": RECIPE, "source": source_key,
                "calibration": dataclasses.asdict(calibration) if calibration else None}

    folder = cache.get_or_build("openvino", int8_key(source_key, component, calibration), build)
    return core.read_model(str(folder / "model.xml"))


def int8_ops(ov_model) -> dict[str, int]:
    """How many FakeQuantize nodes (activations) and int8/uint8 constants (weights) a model holds."""
    counts = {"FakeQuantize": 0, "int8_constants": 0}
    for op in ov_model.get_ops():
        t = op.get_type_name()
        if t == "FakeQuantize":
            counts["FakeQuantize"] += 1
        elif t == "Constant" and str(op.get_output_element_type(0)) in ("i8", "u8", "<Type: 'int8_t'>",
                                                                         "<Type: 'uint8_t'>"):
            counts["int8_constants"] += 1
    return counts


def quantized_layers(ov_model) -> set[str]:
    """Names of the Convolution / MatMul nodes fed by a FakeQuantize (their activations run in int8)."""
    out = set()
    for op in ov_model.get_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            src = op.input(0).get_source_output().get_node()
            if src.get_type_name() == "FakeQuantize":
                out.add(op.get_friendly_name())
    return out


def name_matches(name: str, patterns=KEEP_FLOAT) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)
