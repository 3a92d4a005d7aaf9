"""The reference modules run eagerly by PyTorch."""
from __future__ import annotations

import importlib.util

import torch


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TorchBackend:
    """encode_text(ids) -> context; denoise(z, t, context, extra) -> model output; decode(z) -> image;
    encode(image) -> latent distribution. Latents here are the autoencoder's own (unscaled) ones."""

    name = "torch"
    graph_capturable = True  # its calls can be recorded into the pipeline's CUDA graph
    accepts_control = True  # denoise takes ControlNet residuals as extra["control"]

    def __init__(self, model, device="cpu", dtype: torch.dtype | None = None, kernels: str | None = "auto"):
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype or next(model.unet.parameters()).dtype
        for m in (model.unet, model.vae, model.text_encoder, model.class_embedder, model.cond_stage):
            if m is not None:
                m.to(self.device, self.dtype)
        if kernels == "auto":  # the Triton kernels by default where they compile: on CUDA devices
            kernels = "triton" if self.device.type == "cuda" and _triton_available() else None
        if kernels not in (None, "triton"):
            raise ValueError(f"kernels must be None, 'auto' or 'triton', got {kernels!r}")
        if kernels == "triton":
            from ..optimize import use_triton_kernels

            use_triton_kernels(model.unet)
            use_triton_kernels(model.vae)
        self.kernels = kernels

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, output_layer: int | None = None) -> torch.Tensor:
        """`output_layer` None: the text encoder's own (clip skip picks an earlier one)."""
        return self.model.text_encoder(ids.to(self.device), output_layer=output_layer).float()

    def reload(self, component: str) -> None:
        """Nothing to do: the reference modules run with whatever weights they hold now."""

    @torch.no_grad()
    def embed_class(self, labels: torch.Tensor) -> torch.Tensor:
        return self.model.class_embedder(labels.to(self.device)).float()

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, t, context: torch.Tensor | None, extra: dict | None = None) -> torch.Tensor:
        extra = extra or {}
        labels, cond, control = extra.get("class_labels"), extra.get("timestep_cond"), extra.get("control")
        out = self.model.unet(z.to(self.device, self.dtype), t,
                              None if context is None else context.to(self.device, self.dtype),
                              class_labels=None if labels is None else labels.to(self.device),
                              timestep_cond=None if cond is None else cond.to(self.device, self.dtype),
                              control=None if control is None else [c.to(self.device, self.dtype) for c in control])
        return out.float()

    @torch.no_grad()
    def denoise_cached(self, z: torch.Tensor, t, context: torch.Tensor | None, extra: dict | None, branch: int,
                       feature: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A step of the step cache (ldm_engine.optimize.step_cache): the whole UNet when `feature` is None,
        returning (output, the feature at `branch`), else the shallow part on that feature (output, feature)."""
        from ..optimize.step_cache import deep_forward, shallow_forward

        extra = extra or {}
        labels, cond = extra.get("class_labels"), extra.get("timestep_cond")
        kw = dict(class_labels=None if labels is None else labels.to(self.device),
                  timestep_cond=None if cond is None else cond.to(self.device, self.dtype))
        z = z.to(self.device, self.dtype)
        context = None if context is None else context.to(self.device, self.dtype)
        if feature is None:
            out, feature = deep_forward(self.model.unet, z, t, context, branch, **kw)
        else:
            out = shallow_forward(self.model.unet, z, t, context, branch, feature, **kw)
        return out.float(), feature

    def prepare_controlnet(self, net: torch.nn.Module, name: str | None = None) -> None:
        """Put ControlNet `net` on this backend's device and dtype, with the UNet's kernel swap (`name`, the
        pipeline's name for it, is for the backends that look up a graph made for it)."""
        net.to(self.device, self.dtype)
        if self.kernels == "triton":
            from ..optimize import use_triton_kernels

            use_triton_kernels(net)

    @torch.no_grad()
    def controlnet(self, net: torch.nn.Module, x: torch.Tensor, t, context: torch.Tensor, hint: torch.Tensor,
                   extra: dict | None = None) -> list[torch.Tensor]:
        """ControlNet `net`'s residuals at scale 1: one per UNet input block, then the middle block's."""
        extra = extra or {}
        labels, cond = extra.get("class_labels"), extra.get("timestep_cond")
        return net(x.to(self.device, self.dtype), hint.to(self.device, self.dtype), t,
                   context.to(self.device, self.dtype), class_labels=None if labels is None else labels.to(self.device),
                   timestep_cond=None if cond is None else cond.to(self.device, self.dtype))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.vae.decode(z.to(self.device, self.dtype)).float()

    @torch.no_grad()
    def encode(self, image: torch.Tensor):
        return self.model.vae.encode(image.to(self.device, self.dtype))
