"""The pipeline's ControlNets: loading, the per-call arguments, and the residuals of one denoiser call.

The denoiser (the pipeline's raw_model(x, t)) asks `ControlStep` for the residuals of the current call
and hands them to the backend's UNet, so every sampler and the native loop get control unchanged. Each
ControlNet runs through the backend too (`backend.controlnet`: the module on torch, its own graph on
ONNX Runtime / OpenVINO) and returns its residuals at scale 1; the scales are applied here.
Per step, as diffusers' ControlNet pipelines: a ControlNet is active at step i of n when
start <= i / n and (i + 1) / n <= end; several ControlNets sum their residuals, each with its own image
and scale; with CFG both halves get control, or in guess mode only the conditional half, with the
scales ramping over the residuals as logspace(-1, 0, 13) x scale."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .hint import control_tensor
from .loading import folder_weights, read_controlnet
from .model import ControlNet


@dataclass
class LoadedControlNet:
    name: str
    path: Path
    module: ControlNet
    _hash: str | None = field(default=None, repr=False)

    @property
    def hash(self) -> str:
        """The model hash A1111's ControlNet extension shows ("name [hash]"): the first 8 hex digits of the
        sha256 of the 64 KiB at offset 1 MiB of the weights file (A1111's old short hash)."""
        if self._hash is None:
            self._hash = short_hash(self.path)
        return self._hash


def short_hash(path: Path) -> str:
    """A1111's old short hash of a ControlNet file (or a diffusers folder's weights file)."""
    f = path if path.is_file() else folder_weights(path)
    with f.open("rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def controlnet_name(path, taken) -> str:
    """The name a ControlNet loaded from `path` gets: the file stem (a diffusers folder's name), made unique
    against the names `taken` by the ControlNets loaded before it with _2, _3, ..."""
    stem = Path(path).stem
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}_{k}", k + 1
    return name


def _per_net(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} ControlNet(s); give one per ControlNet "
                         "(in load order) or a single value for all")
    return values


class ControlNets:
    def __init__(self, model, backend):
        self.model, self.backend = model, backend
        self.loaded: list[LoadedControlNet] = []

    def load(self, path) -> str:
        """Read a ControlNet for this model (all checks before it is added); returns its unique name."""
        cfg = self.model.config
        if cfg.conditioning != "text" or cfg.task == "upscale":
            raise ValueError(f"{cfg.name} is not a text-to-image model ({cfg.task}); ControlNets apply to SD 1.x/2.x")
        if not getattr(self.backend, "accepts_control", False):
            raise ValueError(f"the {self.backend.name} backend does not run ControlNets; use backend='torch', "
                             "'onnxruntime', 'openvino' or 'tensorrt'")
        path = Path(path)
        if not path.exists():
            raise ValueError(f"{path}: no such ControlNet file or folder")
        net = read_controlnet(path, cfg.unet)
        if net.control_config.unet.in_channels != cfg.vae.embed_dim:
            raise ValueError(f"{path}: this ControlNet reads {net.control_config.unet.in_channels}-channel latents, the "
                             f"model makes {cfg.vae.embed_dim}-channel ones")
        if net.hint_downsampling != cfg.vae.downsampling_factor:
            raise ValueError(f"{path}: this ControlNet's hint encoder shrinks the control image {net.hint_downsampling}x, "
                             f"the model's autoencoder {cfg.vae.downsampling_factor}x; use a ControlNet for this model")
        name = controlnet_name(path, {c.name for c in self.loaded})
        # its device and dtype (refused here when the backend cannot run it; graph folders find it by name)
        self.backend.prepare_controlnet(net, name)
        self.loaded.append(LoadedControlNet(name, path, net))
        return name

    def unload(self) -> None:
        self.loaded.clear()

    def prepare(self, control_image, scale, start, end, guess_mode: bool, height: int, width: int) -> "ControlInputs | None":
        """Check the call's control arguments (before any work) and load its control images."""
        if not self.loaded:
            if control_image is not None:
                raise ValueError("control_image given but no ControlNet is loaded; load one with pipe.load_controlnet")
            return None
        n = len(self.loaded)
        if control_image is None:
            raise ValueError(f"{n} ControlNet(s) loaded: pass control_image (one per ControlNet) or call "
                             "pipe.unload_controlnets()")
        images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if len(images) != n:
            raise ValueError(f"got {len(images)} control image(s) for {n} loaded ControlNet(s); give one per "
                             "ControlNet, in load order")
        scales = [float(s) for s in _per_net(scale, n, "controlnet_conditioning_scale")]
        starts = [float(s) for s in _per_net(start, n, "control_guidance_start")]
        ends = [float(e) for e in _per_net(end, n, "control_guidance_end")]
        for s in scales:
            if s < 0:
                raise ValueError(f"controlnet_conditioning_scale must be >= 0, got {s}")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control guidance start/end must satisfy 0 <= start < end <= 1, got start={s}, end={e}")
        hints = [control_tensor(img, height, width) for img in images]
        # a global-pooling ControlNet (shuffle) runs in guess mode, as diffusers does
        guess = bool(guess_mode) or self.loaded[0].module.control_config.global_pool
        return ControlInputs(list(self.loaded), hints, scales, starts, ends, guess, self.backend)


@dataclass
class ControlInputs:
    nets: list[LoadedControlNet]
    hints: list[torch.Tensor]  # (1 or B, 3, H, W) in [0, 1] each
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    backend: object  # runs each ControlNet: backend.controlnet(net, x, t, context, hint) -> residuals at scale 1

    def bind(self, timesteps, context: torch.Tensor, guided: bool, batch: int, per_prompt: int) -> "ControlStep":
        """The residual provider for one run: `timesteps` the plan's (descending), `context` the CFG batch's."""
        hints = []
        for h in self.hints:
            if h.shape[0] == 1:
                h = h.repeat(batch, 1, 1, 1)
            elif h.shape[0] * per_prompt == batch:
                h = h.repeat_interleave(per_prompt, dim=0)
            else:
                raise ValueError(f"a control image batch of {h.shape[0]} fits neither 1 nor the {batch // per_prompt} "
                                 "prompt(s)")
            hints.append(h)
        return ControlStep(self, hints, np.asarray(timesteps, dtype=np.float64), context, guided)


class ControlStep:
    def __init__(self, inputs: ControlInputs, hints, timesteps: np.ndarray, context: torch.Tensor, guided: bool):
        net = inputs.nets[0].module
        p = next(net.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.inputs, self.timesteps, self.guided = inputs, timesteps, guided
        self.guess = inputs.guess_mode and guided  # without CFG guess mode only changes the scales
        self.context = context.to(self.device, self.dtype)
        if self.guess:  # only the conditional half [uncond; cond] reaches the ControlNet
            self.context = self.context.chunk(2)[1]
        twice = guided and not self.guess
        self.hints = [(torch.cat([h, h]) if twice else h).to(self.device, self.dtype) for h in hints]

    def step_index(self, t) -> int:
        """The plan step a call at timestep t belongs to (intermediate evaluations count to their step)."""
        t = float(t)
        i = int(np.count_nonzero(self.timesteps >= t - 1e-3)) - 1
        return min(max(i, 0), len(self.timesteps) - 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t) -> list[torch.Tensor] | None:
        """x: the latents of the denoiser call (B, C, h, w), before CFG doubling -> summed residuals for
        the UNet's CFG batch, or None when no ControlNet is active at this step."""
        i, n, ins = self.step_index(t), len(self.timesteps), self.inputs
        x = x.to(self.device, self.dtype)
        x_in = torch.cat([x, x]) if self.guided and not self.guess else x
        total = None
        for net, hint, s, a, b in zip(ins.nets, self.hints, ins.scales, ins.starts, ins.ends):
            keep = not (i / n < a or (i + 1) / n > b)
            if not keep or s == 0.0:
                continue
            m = net.module
            n_res = m.control_config.num_residuals
            # the scale is applied here, outside the ControlNet: one compiled graph serves every scale
            scales = (torch.logspace(-1, 0, n_res, device=self.device) * s
                      if ins.guess_mode and not m.control_config.global_pool else [s] * n_res)
            res = ins.backend.controlnet(m, x_in, t, self.context, hint)
            res = [r.to(self.device, self.dtype) * c for r, c in zip(res, scales)]
            if self.guess:  # the unconditional half gets no control
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            total = res if total is None else [u + v for u, v in zip(total, res)]
        return total
