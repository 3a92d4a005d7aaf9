"""The paper's two training stages on the shapes data: (1) a KL-regularized autoencoder, (2) a latent
diffusion UNet with cross-attention, trained jointly with its CLIP-architecture text encoder."""
from __future__ import annotations

import copy
import math
import random

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import AutoencoderKL, CLIPTextEncoder, CLIPTokenizer, UNetModel
from ..models.autoencoder import DiagonalGaussian
from ..models.configs import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from ..sampling import alphas_cumprod_for
from .data import sample_batch
from .losses import ema_update, gradient_l1

AE_CONFIG = AutoencoderConfig(kind="kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                              norm_groups=8, resolution=64)
UNET_CONFIG = UNetConfig(in_channels=4, out_channels=4, model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1,
                         attention_resolutions=(1, 2, 4), num_head_channels=24, context_dim=64, norm_groups=16)
TEXT_CONFIG = TextEncoderConfig(width=64, layers=2, heads=2, intermediate_size=128)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _log(curve: list, step: int, loss: float, every: int, bar) -> None:
    curve.append(loss)
    if step % every == 0 or step == 1:
        recent = float(np.mean(curve[-every:]))
        bar.write(f"step {step:5d}  loss {recent:.5f}")


def train_autoencoder(steps: int, batch: int = 32, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0,
                      log_every: int = 100, cfg: AutoencoderConfig = AE_CONFIG, bf16: bool = True):
    """Stage 1, perceptual compression: L1 + multi-scale gradient L1 + a small KL term. Returns the
    trained autoencoder (eval mode) and the loss curve. `bf16` autocasts the convolutions (weights
    and the loss stay fp32): 1.8x faster on CPUs with AVX512_BF16."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoencoderKL(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    curve = []
    bar = tqdm(range(1, steps + 1), desc="autoencoder")
    for step in bar:
        x = to_tensor(sample_batch(batch, rng)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            moments = model.quant_conv(model.encoder(x))
        post = DiagonalGaussian(moments.float())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            rec = model.decode(post.sample()).float()
        loss = (rec - x).abs().mean() + gradient_l1(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _log(curve, step, loss.item(), log_every, bar)
    return model.eval().requires_grad_(False), curve


@torch.no_grad()
def latent_scale(ae: AutoencoderKL, n: int = 512, seed: int = 1) -> float:
    """1 / std of the autoencoder's latents: the diffusion model works on unit-variance latents."""
    x = to_tensor(sample_batch(n, random.Random(seed))[0])
    return float(1.0 / ae.encode(x).sample(torch.Generator().manual_seed(seed)).std())


class LatentPool:
    """A fixed pool of training images, encoded once: the posterior (mean, std) of every image and its
    caption. Each draw samples fresh latents z = mean + std * noise, so the encoder's cost (a sixth of a
    training step when paid per batch) is paid once per image instead of once per use."""

    def __init__(self, ae: AutoencoderKL, size: int, seed: int, chunk: int = 256):
        rng = random.Random(seed)
        means, stds, self.captions = [], [], []
        for start in tqdm(range(0, size, chunk), desc="encoding latent pool"):
            images, captions, _ = sample_batch(min(chunk, size - start), rng)
            with torch.no_grad():
                post = ae.encode(to_tensor(images))
            means.append(post.mean)
            stds.append(post.std)
            self.captions.extend(captions)
        self.mean, self.std = torch.cat(means), torch.cat(stds)  # (size, z, h, w) each

    def __len__(self) -> int:
        return len(self.captions)

    def draw(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self), (batch,), generator=gen)
        mean = self.mean[idx]
        return mean + self.std[idx] * torch.randn(mean.shape, generator=gen), [self.captions[i] for i in idx.tolist()]


def train_ldm(ae: AutoencoderKL, scale: float, steps: int, batch: int = 64, lr: float = 8e-4, seed: int = 0,
              cond_drop: float = 0.1, ema_decay: float = 0.998, min_snr: float = 5.0, log_every: int = 100,
              pool_size: int = 32768, unet_cfg: UNetConfig = UNET_CONFIG, text_cfg: TextEncoderConfig = TEXT_CONFIG,
              schedule: ScheduleConfig = ScheduleConfig()):
    """Stage 2, latent diffusion: eps-prediction loss on scaled latents; the text encoder (tau) and the
    UNet (eps) are optimized together; 10 % of captions are dropped to "" for classifier-free guidance.
    The per-sample loss is weighted by min(SNR, min_snr) / SNR (Min-SNR, Hang et al. 2023), which stops
    the nearly-clean timesteps from dominating and converges faster. Batches come from a `LatentPool`
    of `pool_size` encoded images. Returns EMA copies of the UNet and text encoder and the loss curve."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = LatentPool(ae, pool_size, seed)
    gen = torch.Generator().manual_seed(seed)
    unet, text = UNetModel(unet_cfg).train(), CLIPTextEncoder(text_cfg).train()
    tokenizer = CLIPTokenizer(pad_token_id=text_cfg.pad_token_id)
    ids_cache: dict[str, torch.Tensor] = {}

    def ids(captions):
        for c in captions:
            if c not in ids_cache:
                ids_cache[c] = tokenizer([c])[0]
        return torch.stack([ids_cache[c] for c in captions])

    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    ema_unet, ema_text = copy.deepcopy(unet.state_dict()), copy.deepcopy(text.state_dict())
    abar = alphas_cumprod_for(schedule)
    curve = []
    bar = tqdm(range(1, steps + 1), desc="latent diffusion")
    for step in bar:
        z0, captions = pool.draw(batch, gen)
        z0 = z0 * scale
        captions = ["" if rng.random() < cond_drop else c for c in captions]
        t = torch.randint(0, schedule.num_train_timesteps, (batch,))
        eps = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        per_sample = (unet(zt, t, text(ids(captions))) - eps).pow(2).mean(dim=(1, 2, 3))
        snr = abar[t] / (1 - abar[t])
        loss = (per_sample * snr.clamp(max=min_snr) / snr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        _log(curve, step, loss.item(), log_every, bar)
    unet.load_state_dict(ema_unet)
    text.load_state_dict(ema_text)
    return unet.eval().requires_grad_(False), text.eval().requires_grad_(False), curve


def model_config(scale: float) -> LDMConfig:
    return LDMConfig("shapes-ldm", UNET_CONFIG, AE_CONFIG, TEXT_CONFIG, scale_factor=scale, sample_size=16)
