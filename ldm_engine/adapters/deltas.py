"""The weight update ΔW each adapter kind stands for, in float32, and DoRA's re-normalization.

    LoRA  (Hu et al. 2021)            ΔW = up @ down                     up (out, r), down (r, in·kh·kw)
          CP / Tucker conv LoRA        ΔW[i,j] = Σ up[i,m] mid[m,n] down[n,j]  (mid (r, r, kh, kw): LoCon tucker)
    LoHa  (Hyeon-Woo et al. 2022)     ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)  (Hadamard product of two low-rank terms;
          with Tucker cores t1/t2 each term is a Tucker-2 rebuild t ×₁ w_a ×₂ w_b)
    LoKr  (LyCORIS)                   ΔW = w1 ⊗ w2  (Kronecker product; either factor may be low rank
                                      w_a @ w_b, w2 may be a Tucker-2 rebuild with core lokr_t2)
    scale = alpha / rank (alpha missing or 0: 1; PEFT rsLoRA: alpha / sqrt(rank); a 'scale' tensor wins).

DoRA (Liu et al. 2024) keeps a magnitude m per output row (or per input column) and re-normalizes:
    kohya / LyCORIS / A1111 (dora_scale):  D = m ⊙ (W + ΔW) / ‖W + ΔW‖,  W' = W + s·(D − W)
    PEFT / diffusers (lora_magnitude_vector): W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖  (norm per output row)
where s is the user's multiplier; the norm axis of a dora_scale follows its shape, (out, 1, …) per row
or (1, in, …) per column, as LyCORIS writes it for wd_on_out True / False.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import LoraError
from .formats import ModuleWeights


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker-2 rebuild: core (r1, r2, *k), wa (r1, out), wb (r2, in) -> (out, in, *k)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, wa, wb)


def _low_rank(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (out, r[, 1, 1]) @ b (r, in[, kh, kw]) -> (out, in[, kh, kw])."""
    w = a.flatten(1) @ b.flatten(1)
    return w.reshape(a.shape[0], *b.shape[1:])


def raw_delta(mod: ModuleWeights, device=None) -> torch.Tensor:
    """ΔW before the alpha / rank scale, float32 on `device` (the meta device gives only its shape)."""
    t = {k: v.to(device=device, dtype=torch.float32) for k, v in mod.tensors.items() if k not in ("alpha", "scale")}
    kind = mod.kind
    if kind == "lora":
        if "mid" in t:
            return torch.einsum("m n ..., i m, n j -> i j ...", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
        return _low_rank(t["up"], t["down"])
    if kind == "loha":
        if "hada_t1" in t:
            w1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1, w2 = _low_rank(t["hada_w1_a"], t["hada_w1_b"]), _low_rank(t["hada_w2_a"], t["hada_w2_b"])
        return w1 * w2
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]  # (a, c)
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = _low_rank(t["lokr_w2_a"], t["lokr_w2_b"])  # (b, d[, kh, kw])
    w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim))
    return torch.kron(w1, w2.contiguous())  # (a·b, c·d[, kh, kw])


def rank(mod: ModuleWeights) -> int | None:
    t = mod.tensors
    if mod.kind == "lora":
        return t["down"].shape[0]
    if mod.kind == "loha":
        return t["hada_w1_b"].shape[0]
    for name in ("lokr_w2_b", "lokr_w1_b"):  # a LoKr with two full factors has no rank: scale 1
        if name in t:
            return t[name].shape[0]
    return None


def scale(mod: ModuleWeights) -> float:
    """The file's own factor on ΔW: alpha / rank (see the module docstring)."""
    t = mod.tensors
    if "scale" in t:
        return float(t["scale"])
    r = rank(mod)
    alpha = float(t["alpha"]) if "alpha" in t else mod.alpha
    if r is None or alpha is None or alpha == 0:  # kohya and LyCORIS store alpha = rank for 'no alpha'
        return 1.0
    return alpha / (math.sqrt(r) if mod.rslora else r)


def fit(delta: torch.Tensor, shape: tuple[int, ...], pad_channels: bool, what: str) -> torch.Tensor:
    """ΔW in the target weight's layout: a 1x1 conv and a linear are the same matrix; a conv flattened
    to (out, in·kh·kw) is reshaped; with `pad_channels` (the first conv of an inpainting UNet) a
    4-channel update leaves the extra input channels untouched, as A1111 does."""
    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() == math.prod(shape) and delta.shape[0] == shape[0]:
        return delta.reshape(shape)
    if (pad_channels and delta.ndim == len(shape) == 4 and delta.shape[0] == shape[0]
            and delta.shape[2:] == shape[2:] and delta.shape[1] < shape[1]):
        return F.pad(delta, (0, 0, 0, 0, 0, shape[1] - delta.shape[1]))
    raise LoraError(f"{what}: the LoRA's update has shape {tuple(delta.shape)} but the model's weight has shape "
                    f"{tuple(shape)}; the LoRA was made for another architecture (e.g. an SD2 LoRA on an SD1 model)")


def _norm(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """‖w‖ per output row -> (out, 1, ...) or per input column -> (1, in, ...)."""
    ones = [1] * (w.ndim - 1)
    if per_row:
        return w.flatten(1).norm(dim=1).reshape(w.shape[0], *ones)
    return w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, w.shape[1], *ones[1:])


def magnitude_layout(magnitude_shape: tuple[int, ...], shape: tuple[int, ...], mode: str, what: str) -> bool:
    """True when the DoRA magnitude is per output row, False per input column; LoraError when it fits neither."""
    n = math.prod(magnitude_shape)
    out, inp = shape[0], shape[1]
    if mode == "peft" and n == out:
        return True
    if mode == "a1111":
        if n == out and (len(magnitude_shape) < 2 or magnitude_shape[0] == out):
            return True
        if n == inp and (len(magnitude_shape) < 2 or magnitude_shape[0] == 1):
            return False
    raise LoraError(f"{what}: DoRA magnitude of shape {tuple(magnitude_shape)} fits neither the rows nor the "
                    f"columns of the weight {tuple(shape)}; the DoRA weight decomposition cannot be applied")


def apply(weight: torch.Tensor, mod: ModuleWeights, multiplier: float, pad_channels: bool, what: str) -> torch.Tensor:
    """The new weight (float32) after this module at `multiplier`: W + s·ΔW, or DoRA (module docstring)."""
    delta = fit(raw_delta(mod, weight.device) * scale(mod), weight.shape, pad_channels, what)
    if mod.dora is None:
        return weight + multiplier * delta
    key = "magnitude" if mod.dora == "peft" else "dora_scale"
    m = mod.tensors[key].to(device=weight.device, dtype=torch.float32)
    per_row = magnitude_layout(tuple(m.shape), tuple(weight.shape), mod.dora, what)
    m = m.reshape(weight.shape[0], *[1] * (weight.ndim - 1)) if per_row else \
        m.reshape(1, weight.shape[1], *[1] * (weight.ndim - 2))
    if mod.dora == "peft":
        merged = weight + multiplier * delta
        return merged * (m / _norm(merged, True))
    merged = weight + delta
    return weight + multiplier * (merged * (m / _norm(merged, per_row)) - weight)
