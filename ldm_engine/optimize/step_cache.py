"""Step-feature caching: DeepCache (Ma, Fang, Wang 2023, "DeepCache: Accelerating Diffusion Models for
Free"), on every backend.

Between neighbouring denoising steps the UNet's deep features change little. On a *full* step the
whole UNet runs and the feature entering the shallow up-branch is kept; on the steps in between only
the shallow part runs and takes that kept feature in place of everything deeper:

    full step     input_blocks[0..N-1] -> middle_block -> output_blocks[0..N-1]
                                                   keep h = input of output_blocks[N-1-K]
    shallow step  input_blocks[0..K]  ->  h (kept)  -> output_blocks[N-1-K..N-1]

N is the number of input (and output) blocks of the original-layout UNet and K the branch
(`cache_branch`). The skips hs[0..K] the shallow output blocks consume are exactly the ones the shallow
input blocks make, so a shallow step is the same network with the deep path frozen. Branch K is the
reference package's `cache_branch_id`: its (block, layer) = divmod(K, layers per down block + 1) counts
resnets then the downsampler of each diffusers down block, which is input block K + 1 here; branch 0
(the package's default) runs conv_in and the last output block only.

Which steps are full (0-based, counted from the first step the call samples, so img2img counts from its
start): "uniform" every `interval`-th; "non-uniform" the package's quadratic schedule centred at
`center` (denser there, sparser at both ends) with the same number of full steps, ceil(n / interval).
A UNet call belongs to the step whose timestep it is given; every call of a full step runs the whole
UNet (PLMS's first step, which also evaluates the next step's timestep, counts that call as the next step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCHEDULES = ("uniform", "non-uniform")
NON_UNIFORM_CENTER = 15  # the reference scripts' defaults for the non-uniform schedule
NON_UNIFORM_POWER = 1.4


def full_steps(n: int, interval: int, schedule: str = "uniform", center: int = NON_UNIFORM_CENTER,
               power: float = NON_UNIFORM_POWER) -> list[int]:
    """The 0-based indices of the full steps among n sampling steps."""
    if interval == 1:
        return list(range(n))
    if schedule == "uniform":
        return list(range(0, n, interval))
    k = math.ceil(n / interval)  # as many full steps as the uniform schedule
    center = min(center, n - 1)  # short runs: the densest part at the end rather than past it
    while power > 1:
        # full steps at center + x^power for x evenly spaced between -center^(1/p) and (n-center)^(1/p):
        # dense around the center, sparse towards both ends; the power shrinks until k distinct steps fit
        # (the root of the negative end is complex, as in the reference; the real part of x^power counts)
        x = np.linspace((-center) ** (1 / power), (n - center) ** (1 / power), k + 1)
        picked = [0] + [int(v) + center for v in np.unique(np.int32(np.real(x ** power)))[1:-1]]
        if len(picked) == k:
            return sorted(picked)
        power -= 0.02
    raise ValueError(f"the non-uniform cache schedule finds no {k} distinct full steps among {n} steps around step "
                     f"{center}; use cache_schedule='uniform' or a smaller cache_interval")


def branch_count(unet_config) -> int:
    """Branches a UNet of this config has: one per input block (the last caches the middle block only)."""
    levels = len(unet_config.channel_mult)
    return 1 + levels * unet_config.num_res_blocks + (levels - 1)


@dataclass(frozen=True)
class CacheSettings:
    interval: int
    branch: int = 0
    schedule: str = "uniform"

    @classmethod
    def checked(cls, interval, branch, schedule, unet_config) -> "CacheSettings | None":
        """None when caching is off (interval None); a clear error for settings the model cannot take."""
        if interval is None:
            return None
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"cache_interval must be an integer >= 1 (None turns caching off), got {interval!r}")
        top = branch_count(unet_config) - 1
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= top:
            raise ValueError(f"cache_branch must be an integer from 0 (shallowest, fastest) to {top} (caches the "
                             f"middle block only) for this UNet, got {branch!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"cache_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        return cls(interval, branch, schedule)


# ---- the two halves of a step, run from outside the reference UNet -----------------------------

def _embedding(unet, x, t, class_labels, timestep_cond):
    from ..models.unet import embed_time

    return embed_time(unet, x, t, class_labels, timestep_cond)


def deep_forward(unet, x: torch.Tensor, t, context, branch: int, class_labels=None, timestep_cond=None):
    """The whole UNet (a full step): (model output, the feature entering output block N-1-branch)."""
    emb = _embedding(unet, x, t, class_labels, timestep_cond)
    hs, h = [], x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    first_shallow = len(unet.output_blocks) - 1 - branch
    feature = h
    for i, block in enumerate(unet.output_blocks):
        if i == first_shallow:
            feature = h
        h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
    return unet.out(h), feature


def shallow_forward(unet, x: torch.Tensor, t, context, branch: int, feature: torch.Tensor, class_labels=None,
                    timestep_cond=None) -> torch.Tensor:
    """The shallow part only (a cached step): input blocks 0..branch, the kept feature, the last branch+1
    output blocks."""
    emb = _embedding(unet, x, t, class_labels, timestep_cond)
    hs, h = [], x
    for block in unet.input_blocks[:branch + 1]:
        h = block(h, emb, context)
        hs.append(h)
    h = feature
    for block in unet.output_blocks[len(unet.output_blocks) - 1 - branch:]:
        h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
    return unet.out(h)


# ---- the denoiser part --------------------------------------------------------------------------

class CachedDenoise:
    """denoise(z, t, context, extra) with the step cache: full or shallow by the step t belongs to.

    `backend.denoise_cached(z, t, context, extra, branch, feature)` runs the whole UNet when feature is
    None and returns (output, new feature), else the shallow part with that feature (output, feature).
    The step of a call is t's position among the plan's timesteps; a call at a timestep the plan does not
    list (a second evaluation inside a step) belongs to the step before it."""

    def __init__(self, backend, settings: CacheSettings, timesteps):
        self.backend, self.settings = backend, settings
        self.timesteps = [float(t) for t in timesteps]
        self.full = set(full_steps(len(self.timesteps), settings.interval, settings.schedule))
        self.step = 0
        self.feature = None
        self.calls = {"full": 0, "shallow": 0}

    def _step_of(self, t) -> int:
        value = float(torch.as_tensor(t).reshape(-1)[0])
        for i in range(self.step, len(self.timesteps)):  # steps only move forward
            if abs(self.timesteps[i] - value) <= 1e-4 * max(1.0, abs(value)):
                return i
        return self.step

    def __call__(self, z: torch.Tensor, t, context, extra: dict | None = None) -> torch.Tensor:
        self.step = self._step_of(t)
        # every call of a full step runs the whole UNet and refreshes the feature (so does a first call,
        # and a call of another batch size, which never happens within one sampling run)
        full = (self.step in self.full or self.feature is None or self.feature.shape[0] != z.shape[0])
        out, feature = self.backend.denoise_cached(z, t, context, extra, self.settings.branch,
                                                   None if full else self.feature)
        self.feature = feature
        self.calls["full" if full else "shallow"] += 1
        return out
