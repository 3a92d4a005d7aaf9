"""Sampling beyond a model's training size in overlapping patches, as the LDM code does with
`split_input_params` (CompVis latent-diffusion, ldm/models/diffusion/ddpm.py: `get_fold_unfold`,
`apply_model`, `decode_first_stage`; notebook_helpers.py sets 128-pixel patches at stride 64 on the latent
for super-resolution).

Every denoiser call runs the model on each patch of its input (the latent with its concatenated condition)
and blends the patch outputs: each pixel of a patch is weighted by its normalised distance to the patch
border (0 at the border, 0.5 at the centre: `delta_border`), clipped to [0.01, 0.5], and the weighted sum
is divided by the sum of the weights of the patches that cover the pixel (the original's fold of the
weighting). Decoding runs the autoencoder on the same patches, `factor` times larger in pixels.

Where the original's grid (an unfold with that stride) would leave the last rows or columns uncovered, the
last patch here sits flush with the border; on sizes the grid fits exactly, patches and weights are the
original's. A side shorter than the patch gets one patch of that side (the original's "reducing kernel").
The alternative is convolutional sampling: the whole latent in one UNet call (tile=False).
"""
from __future__ import annotations

import torch

# (patch side, stride) in latent pixels: notebook_helpers.py's split_input_params (ks 128, stride 64)
DEFAULT_PATCH = (128, 64)
TILED_TASKS = ("superres", "semantic", "inpaint")  # the models that are conditioned by concatenation
CLIP_MIN, CLIP_MAX = 0.01, 0.5  # clip_min_weight / clip_max_weight of split_input_params


def resolve_tile(tile, cfg) -> tuple[int, int] | None:
    """`tile` of a Pipeline call -> (patch side, stride) in latent pixels, or None for convolutional
    sampling. False / None: convolutional; True: DEFAULT_PATCH; (side, stride): those."""
    if tile is None or tile is False:
        return None
    if cfg.task not in TILED_TASKS or (cfg.task == "inpaint" and cfg.unet.in_channels != 7):
        raise ValueError(f"tile applies to the models conditioned by concatenation (LDM super-resolution, semantic "
                         f"synthesis, the big LDM inpainting model); {cfg.name} is a {cfg.task} model")
    if tile is True:
        side, stride = DEFAULT_PATCH
    elif (isinstance(tile, (tuple, list)) and len(tile) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in tile)):
        side, stride = tile
    else:
        raise ValueError(f"tile must be False (convolutional), True (patches of {DEFAULT_PATCH[0]} latent pixels at "
                         f"stride {DEFAULT_PATCH[1]}) or (side, stride) in latent pixels, got {tile!r}")
    m = 2 ** (len(cfg.unet.channel_mult) - 1)  # each patch goes through the UNet's downsamplings
    if side < m or side % m:
        raise ValueError(f"tile side must be a positive multiple of {m} latent pixels for this model, got {side}")
    if not 0 < stride <= side:
        raise ValueError(f"tile stride must be in [1, side={side}] so that patches overlap or touch, got {stride}")
    return side, stride


def positions(size: int, side: int, stride: int) -> list[int]:
    """Start offsets of the patches along one axis: 0, stride, 2 stride, ... and a last one flush with the end."""
    if size <= side:
        return [0]
    starts = list(range(0, size - side + 1, stride))
    if starts[-1] != size - side:
        starts.append(size - side)
    return starts


def border_weights(h: int, w: int) -> torch.Tensor:
    """(h, w) weights of one patch: distance to the nearest border in coordinates normalised to [0, 1]
    (the original's delta_border), clipped to [CLIP_MIN, CLIP_MAX]."""
    y = torch.arange(h, dtype=torch.float32)[:, None] / max(h - 1, 1)
    x = torch.arange(w, dtype=torch.float32)[None, :] / max(w - 1, 1)
    edge = torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))
    return edge.clamp(CLIP_MIN, CLIP_MAX)


def blend(fn, x: torch.Tensor, side: int, stride: int, factor: int = 1) -> torch.Tensor:
    """fn on every patch of x (B, C, H, W), the outputs (B, C', factor H', factor W' per patch) blended by
    border weights into one (B, C', factor H, factor W) result."""
    H, W = x.shape[-2:]
    kh, kw = min(side, H), min(side, W)
    if kh == H and kw == W:  # one patch covers it all: the whole input in one call, as convolutional sampling
        return fn(x)
    out = weight_sum = None
    for i in positions(H, kh, stride):
        for j in positions(W, kw, stride):
            o = fn(x[..., i:i + kh, j:j + kw])
            if out is None:  # the output's channels and dtype are known from the first patch
                out = o.new_zeros((*o.shape[:2], H * factor, W * factor))
                weight_sum = o.new_zeros((H * factor, W * factor))
                wt = border_weights(kh * factor, kw * factor).to(o.device, o.dtype)
            rows, cols = slice(i * factor, (i + kh) * factor), slice(j * factor, (j + kw) * factor)
            out[..., rows, cols] += o * wt
            weight_sum[rows, cols] += wt
    return out / weight_sum


def patchwise(denoise, side: int, stride: int):
    """A backend `denoise(z, t, context, extra)` that runs the UNet patch by patch (the original's
    apply_model with split_input_params). `z` holds the latent and its concatenated condition, so both are
    cut into the same patches; context and extra (no spatial tensors in them) go to every patch as they are."""

    def run(z: torch.Tensor, t, context, extra=None) -> torch.Tensor:
        if extra and extra.get("control") is not None:
            raise ValueError("ControlNet residuals cannot be cut into patches; use tile=False")
        return blend(lambda p: denoise(p, t, context, extra), z, side, stride)

    return run


def decode_patches(decode, z: torch.Tensor, side: int, stride: int, factor: int) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, factor h, factor w), the autoencoder run on the
    sampling patches and blended the same way (the original's patch_distributed_vq decoding)."""
    return blend(decode, z, side, stride, factor)
