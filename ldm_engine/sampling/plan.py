"""A sampling plan: which timesteps (and noise levels) a sampler visits, and how a start latent is made."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class Plan:
    timesteps: np.ndarray  # (n,) model timesteps, descending
    alphas_cumprod: torch.Tensor  # (T,) float32
    num_inference_steps: int  # N of the full schedule (discrete samplers step t -> t - T // N)
    sigmas: np.ndarray | None = None  # (n + 1,) noise levels of the steps, ending at 0 (continuous samplers)
    # "vp": latents are x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (DDIM, DDPM, PLMS, DPM-Solver);
    # "sigma": latents are x = x0 + sigma eps (Euler samplers).
    space: str = "vp"
    init_sigma_leading: bool = False  # Euler with leading spacing starts at sqrt(sigma_max^2 + 1)
    timestep_scaling: float = 10.0  # LCM: timestep scaling of the consistency boundary condition

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def step_stride(self) -> int:
        return self.num_train_timesteps // self.num_inference_steps

    def abar(self, t: int) -> float:
        """alpha-bar at integer timestep t; t < 0 means 'before the first training step' (alpha-bar[0])."""
        return float(self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod[0])

    def tail(self, start: int) -> "Plan":
        """The plan from step `start` on (img2img / SDEdit skips the first steps)."""
        sig = None if self.sigmas is None else self.sigmas[start:]
        return replace(self, timesteps=self.timesteps[start:], sigmas=sig)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """Start of pure-noise sampling: unit noise scaled to the first noise level."""
        if self.space == "vp":
            return noise
        s = float(np.max(self.sigmas))
        return noise * ((s ** 2 + 1) ** 0.5 if self.init_sigma_leading else s)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 noised to the plan's first step (forward process q(x_t | x0))."""
        if self.space == "sigma":
            return x0 + noise * float(self.sigmas[0])
        a = self.abar(int(self.timesteps[0])) if self.sigmas is None else 1 / (float(self.sigmas[0]) ** 2 + 1)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise


def after_step(callback, info: dict, x: torch.Tensor) -> torch.Tensor:
    """Call the per-step callback; a tensor it returns replaces the latents (latent-blending inpainting)."""
    if callback is None:
        return x
    out = callback(info)
    return out if isinstance(out, torch.Tensor) else x
