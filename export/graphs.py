"""What each exported graph is: the module it wraps, its named inputs and outputs, example inputs and
the axes that stay dynamic. One `GraphSpec` per component; the ONNX exporter, the artifact cache,
the runtime backends and the TensorRT profiles all read the same spec, so names never drift apart.

Components (those a model has):
    text_encoder  input_ids (B, L) int64                       -> context (B, L, D)
    unet          sample (B, C, h, w), timestep (B,) float32,
                  [context (B, L, D)], [class_labels (B,) int64],
                  [timestep_cond (B, time_cond_proj_dim)]    -> model_output (B, C_out, h, w)
    vae_decoder   latent (B, z, h, w)                          -> image (B, 3, H, W) in [-1, 1]
    vae_encoder   image (B, 3, H, W)                           -> moments (B, 2z, h, w) (KL) | latent (B, z, h, w) (VQ)
With ControlNets (export/control_graphs.py): `controlnet` (one per loaded ControlNet) and
`unet_control` (the UNet taking the ControlNet residuals as inputs); `unet_control_fused` (the UNet and
one ControlNet in one graph) is exported for measurement only. The step cache
(export/step_cache_graphs.py) has `unet_deep_b<K>` and `unet_shallow_b<K>`.

The UNet is exported for the classifier-free-guidance batch: B is 2 x images per call when guided
(images per call for LCM-distilled UNets, whose guidance is the timestep_cond embedding).
Latents here are the autoencoder's own, unscaled ones (scale_factor is applied by the pipeline).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
CONTROL_COMPONENTS = ("unet_control", "controlnet")  # graphs that exist once a ControlNet is loaded
FUSED_CONTROL = "unet_control_fused"  # UNet + one ControlNet in one graph: measured, not run by the backends
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Shape:
    """The image shape a graph is made for: pixel height/width and images per call (before CFG)."""

    height: int
    width: int
    batch: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'512x512,1' (HxW,batch) or '512x512' (batch 1)."""
        try:
            size, _, batch = text.partition(",")
            h, w = size.lower().split("x")
            shape = cls(int(h), int(w), int(batch) if batch else 1)
        except ValueError:
            raise ValueError(f"a static shape is HxW,batch such as 512x512,1; got {text!r}") from None
        if min(shape.height, shape.width, shape.batch) < 1:
            raise ValueError(f"a static shape needs positive sizes, got {text!r}")
        return shape

    def tag(self) -> str:
        return f"{self.height}x{self.width}b{self.batch}"


@dataclass
class GraphSpec:
    component: str
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    example: tuple  # example inputs, in order, on the CPU
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    float_inputs: tuple[str, ...] = ()  # inputs cast to the export dtype


class UNetGraph(nn.Module):
    """The UNet with every input a tensor: timestep (B,) float32, optional context, class labels and
    (LCM-distilled UNets) the guidance embedding timestep_cond; then `residuals` ControlNet residuals
    (the unet_control graph) or none."""

    def __init__(self, unet, has_context: bool, has_labels: bool, has_cond: bool = False, residuals: int = 0):
        super().__init__()
        self.unet, self.has_context, self.has_labels, self.has_cond = unet, has_context, has_labels, has_cond
        self.residuals = residuals

    def forward(self, sample, timestep, *rest):
        rest = list(rest)
        context = rest.pop(0) if self.has_context else None
        labels = rest.pop(0) if self.has_labels else None
        cond = rest.pop(0) if self.has_cond else None
        control = rest[-self.residuals:] if self.residuals else None
        return self.unet(sample, timestep, context, class_labels=labels, timestep_cond=cond, control=control)


class TextEncoderGraph(nn.Module):
    """The text encoder ending at `output_layer` (None: its own; another one for clip skip)."""

    def __init__(self, text_encoder, output_layer: int | None = None):
        super().__init__()
        self.text_encoder, self.output_layer = text_encoder, output_layer

    def forward(self, input_ids):
        return self.text_encoder(input_ids, output_layer=self.output_layer)


class DecoderGraph(nn.Module):
    """latent -> image; a VQ decoder snaps the latent to its codebook first, as the reference does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


class EncoderGraph(nn.Module):
    """image -> the encoder's raw output: KL moments (mean and logvar stacked on channels) or the VQ latent."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.quant_conv(self.vae.encoder(image))


def add_optional_unet_inputs(ucfg, batch: int, names: list, example: list, axes: dict) -> None:
    """Append the inputs only some UNets (and their ControlNets) take, in graph order: class labels (B,)
    int64 and the LCM guidance embedding timestep_cond (B, time_cond_proj_dim)."""
    if ucfg.num_classes is not None:
        names.append("class_labels")
        example.append(torch.zeros(batch, dtype=torch.int64))
        axes["class_labels"] = {0: "batch"}
    if ucfg.time_cond_proj_dim is not None:
        names.append("timestep_cond")
        example.append(torch.randn(batch, ucfg.time_cond_proj_dim))
        axes["timestep_cond"] = {0: "batch"}


def available_components(model) -> list[str]:
    """The components `model` (a LoadedModel) has, in export order."""
    names = ["unet", "vae_decoder", "vae_encoder"]
    return (["text_encoder"] if model.text_encoder is not None else []) + names


def pixel_multiple(model) -> int:
    """Image sides must divide by this: the autoencoder's factor times the UNet's downsamplings."""
    return model.config.vae.downsampling_factor * 2 ** (len(model.config.unet.channel_mult) - 1)


def latent_size(model, shape: Shape) -> tuple[int, int]:
    m = pixel_multiple(model)
    if shape.height % m or shape.width % m:
        raise ValueError(f"height and width must be multiples of {m} for this model, got {shape.height}x{shape.width}")
    f = model.config.vae.downsampling_factor
    return shape.height // f, shape.width // f


def default_example_shape(model) -> Shape:
    """A small shape for tracing dynamic graphs: fast to trace, any size runs afterwards."""
    f = model.config.vae.downsampling_factor
    return Shape(8 * f, 8 * f, 1)


def graph_spec(model, component: str, shape: Shape | None = None, output_layer: int | None = None,
               controlnet=None) -> GraphSpec:
    """The spec of one component. `shape` None: dynamic batch/height/width, traced at a small shape;
    a Shape: everything static at that shape (the UNet at 2 x batch, the CFG batch). `output_layer`:
    the text encoder's last layer when not its own (clip skip). `controlnet`: the ControlNet module of
    the `controlnet` component."""
    if component in CONTROL_COMPONENTS or component == FUSED_CONTROL:
        from .control_graphs import controlnet_spec, fused_control_spec, unet_control_spec

        if component == "unet_control":
            return unet_control_spec(model, shape)
        if controlnet is None:
            raise ValueError(f"the {component} graph is made from a ControlNet: pass controlnet=")
        return (controlnet_spec if component == "controlnet" else fused_control_spec)(model, controlnet, shape)
    from .step_cache_graphs import parse_cache_component, step_cache_spec

    if parse_cache_component(component) is not None:  # the step cache's deep / shallow UNet graphs
        return step_cache_spec(model, component, shape)
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
    cfg = model.config
    dynamic = shape is None
    s = default_example_shape(model) if dynamic else shape
    h, w = latent_size(model, s)
    b = s.batch
    if component == "text_encoder":
        if model.text_encoder is None:
            raise ValueError("this model has no text encoder (it is unconditional or class-conditional)")
        tcfg = model.text_encoder.config
        ids = torch.zeros(b, tcfg.max_length, dtype=torch.int64)
        return GraphSpec(component, TextEncoderGraph(model.text_encoder, output_layer), ["input_ids"], ["context"], (ids,),
                         {"input_ids": {0: "batch"}, "context": {0: "batch"}} if dynamic else {})
    if component == "unet":
        ucfg = cfg.unet
        has_context = bool(ucfg.context_dim)
        has_labels = ucfg.num_classes is not None
        has_cond = ucfg.time_cond_proj_dim is not None
        b2 = b if has_cond else 2 * b  # the classifier-free-guidance batch (LCM-distilled UNets have none)
        names = ["sample", "timestep"]
        example = [torch.randn(b2, ucfg.in_channels, h, w), torch.full((b2,), 500.0)]
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                "model_output": {0: "batch", 2: "height", 3: "width"}}
        if has_context:
            length = model.text_encoder.config.max_length if model.text_encoder is not None else 1
            names.append("context")
            example.append(torch.randn(b2, length, ucfg.context_dim))
            axes["context"] = {0: "batch", 1: "tokens"}
        add_optional_unet_inputs(ucfg, b2, names, example, axes)
        floats = tuple(n for n in names if n in ("sample", "context", "timestep_cond"))
        return GraphSpec(component, UNetGraph(model.unet, has_context, has_labels, has_cond), names, ["model_output"],
                         tuple(example), axes if dynamic else {}, floats)
    z = cfg.vae.embed_dim
    if component == "vae_decoder":
        return GraphSpec(component, DecoderGraph(model.vae), ["latent"], ["image"], (torch.randn(b, z, h, w),),
                         {"latent": {0: "batch", 2: "height", 3: "width"},
                          "image": {0: "batch", 2: "height", 3: "width"}} if dynamic else {}, ("latent",))
    out = "moments" if cfg.vae.kind == "kl" else "latent"
    return GraphSpec(component, EncoderGraph(model.vae), ["image"], [out],
                     (torch.rand(b, 3, s.height, s.width) * 2 - 1,),
                     {"image": {0: "batch", 2: "height", 3: "width"},
                      out: {0: "batch", 2: "height", 3: "width"}} if dynamic else {}, ("image",))
