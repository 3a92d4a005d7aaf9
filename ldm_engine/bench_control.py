"""`ldm-bench --controlnet`: the per-step cost of one ControlNet on each backend. A ControlNet of the
model's architecture with random weights (timings do not depend on them) is written once; each
configuration loads it after its plain runs and times the same runs again:
    controlnet_s         median ControlNet call (the CFG batch)
    control_unet_step_s  median UNet call that adds the residuals (unet_control on the graph backends)
    control_step_s       their sum: one denoising step with the ControlNet
    control_cost_x       control_step_s / unet_step_s (about 1.5 expected: the ControlNet is a UNet encoder)
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

CONTROL_FIELDS = ("controlnet_s", "control_unet_step_s", "control_step_s", "control_cost_x")
_HINT_WIDTHS = (16, 32, 96, 256)  # the hint encoder of SD's ControlNets; fewer steps for a smaller autoencoder factor


def random_controlnet_file(model, folder: Path) -> Path:
    """A ControlNet for `model`'s UNet with random weights, saved in the original layout
    (`control_model.*` safetensors) so that it loads like any downloaded one."""
    from safetensors.torch import save_file

    from .control import ControlNet, ControlNetConfig

    f = model.config.vae.downsampling_factor
    steps = int(math.log2(f))
    if 2 ** steps != f or steps >= len(_HINT_WIDTHS):
        raise ValueError(f"no ControlNet hint encoder for an autoencoder factor of {f}")
    cfg = ControlNetConfig.for_unet(model.config.unet, model.config.vae.embed_dim,
                                    hint_channels=_HINT_WIDTHS[:steps + 1])
    torch.manual_seed(0)
    net = ControlNet(cfg)
    path = Path(folder) / "random_controlnet.safetensors"
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def control_row(pipe, timer, run, path: Path, res: int, warmup: int, repeat: int, unet_step: float, progress) -> dict:
    """The CONTROL_FIELDS of one configuration (None each where its backend runs no ControlNets).
    `run(n_steps, **call_kwargs)` runs the pipeline; `timer` records its backend's calls."""
    try:
        pipe.load_controlnet(path)
    except ValueError as e:
        progress(f"[{pipe.backend.name}] ControlNet skipped: {e}")
        return dict.fromkeys(CONTROL_FIELDS)
    hint = torch.rand(1, 3, res, res, generator=torch.Generator().manual_seed(0))
    try:
        for _ in range(warmup):
            run(2, control_image=hint)
        net_t, unet_t = [], []
        for i in range(repeat):
            timer.reset()
            run(None, control_image=hint)
            net_t += timer.durations("controlnet")
            unet_t += timer.durations("denoise")
            progress(f"[{pipe.backend.name}] ControlNet run {i + 1}/{repeat}")
    finally:
        pipe.unload_controlnets()
    net_s, step_unet = statistics.median(net_t), statistics.median(unet_t)
    return {"controlnet_s": net_s, "control_unet_step_s": step_unet, "control_step_s": net_s + step_unet,
            "control_cost_x": (net_s + step_unet) / unet_step}
