"""Swap the UNet's and autoencoder's attention and GroupNorm(+SiLU) layers for Triton-kernel-backed
ones. The swapped modules hold the very same parameters; only their forward changes."""
from __future__ import annotations

from torch import nn

from ..models import attention as unet_attn
from ..models import autoencoder_blocks as vae_blocks


def _kernels():
    try:
        from ldm_engine import kernels
    except ImportError as e:
        raise RuntimeError("kernels='triton' needs Triton: pip install 'ldm_engine[triton]'") from e
    return kernels


class KernelGroupNorm(nn.Module):
    """GroupNorm (optionally followed by SiLU) as one Triton kernel, over the original module's weights."""

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__()
        self.norm, self.silu = norm, silu

    def forward(self, x):
        n = self.norm
        return _kernels().group_norm(x, n.num_groups, n.weight, n.bias, n.eps, silu=self.silu)


class KernelCrossAttention(nn.Module):
    def __init__(self, attn: unet_attn.CrossAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x, context=None):
        a = self.attn
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, t.shape[1], a.heads, -1).transpose(1, 2)
                   for t in (a.to_q(x), a.to_k(context), a.to_v(context)))
        out = _kernels().flash_attention(q, k, v)
        return a.to_out(out.transpose(1, 2).reshape(b, n, -1))


class KernelAttnBlock(nn.Module):
    """The autoencoder's single-head pixel attention with the fused kernel."""

    def __init__(self, block: vae_blocks.AttnBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        b, c, h, w = x.shape
        hn = blk.norm(x)
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(2, 3) for p in (blk.q, blk.k, blk.v))
        out = _kernels().flash_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + blk.proj_out(out)


class KernelAttentionBlock(nn.Module):
    """The ADM qkv attention block of unconditional LDMs with the fused kernel."""

    def __init__(self, block: unet_attn.AttentionBlock):
        super().__init__()
        self.block = block

    def forward(self, x, context=None):
        blk = self.block
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = blk.qkv(blk.norm(flat))
        q, k, v = qkv.reshape(b * blk.heads, -1, h * w).transpose(1, 2).chunk(3, dim=-1)
        out = _kernels().flash_attention(q[None], k[None], v[None])[0]
        out = out.transpose(1, 2).reshape(b, c, h * w)
        return (flat + blk.proj_out(out)).reshape(b, c, h, w)


class FusedResnetBlock(nn.Module):
    """The autoencoder's ResnetBlock with each GroupNorm + SiLU pair fused."""

    def __init__(self, block: vae_blocks.ResnetBlock):
        super().__init__()
        self.block = block
        self.gn1, self.gn2 = KernelGroupNorm(block.norm1, True), KernelGroupNorm(block.norm2, True)

    def forward(self, x):
        blk = self.block
        h = blk.conv2(self.gn2(blk.conv1(self.gn1(x))))
        return (x if blk.nin_shortcut is None else blk.nin_shortcut(x)) + h


def _swap_sequential_pairs(seq: nn.Sequential, fuse: bool) -> None:
    """[GroupNorm, SiLU, ...] -> [GroupNorm+SiLU kernel, Identity, ...] (or the kernel alone when not fusing)."""
    for i, layer in enumerate(list(seq)):
        if isinstance(layer, nn.GroupNorm):
            fused = fuse and i + 1 < len(seq) and isinstance(seq[i + 1], nn.SiLU)
            seq[i] = KernelGroupNorm(layer, silu=fused)
            if fused:
                seq[i + 1] = nn.Identity()


def use_triton_kernels(module: nn.Module) -> nn.Module:
    """Swap in place every supported layer of a UNet or autoencoder (reference modules); returns it."""
    from ..models.unet import ResBlock

    if getattr(module, "_uses_triton_kernels", False):
        return module
    module._uses_triton_kernels = True
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, unet_attn.CrossAttention):
                setattr(parent, name, KernelCrossAttention(child))
            elif isinstance(child, unet_attn.AttentionBlock):
                child.norm = KernelGroupNorm(child.norm, silu=False)
                setattr(parent, name, KernelAttentionBlock(child))
            elif isinstance(child, vae_blocks.AttnBlock):
                child.norm = KernelGroupNorm(child.norm, silu=False)
                setattr(parent, name, KernelAttnBlock(child))
            elif isinstance(child, vae_blocks.ResnetBlock):
                setattr(parent, name, FusedResnetBlock(child))
            elif isinstance(child, unet_attn.SpatialTransformer):
                child.norm = KernelGroupNorm(child.norm, silu=False)
            elif isinstance(child, (vae_blocks.Encoder, vae_blocks.Decoder)):
                child.norm_out = KernelGroupNorm(child.norm_out, silu=False)  # its SiLU is functional
        if isinstance(parent, ResBlock):
            _swap_sequential_pairs(parent.in_layers, fuse=True)
            # with scale-shift the norm output is modulated before the SiLU: no fusion there
            _swap_sequential_pairs(parent.out_layers, fuse=not parent.scale_shift)
        elif hasattr(parent, "out") and isinstance(getattr(parent, "out"), nn.Sequential) and hasattr(parent, "input_blocks"):
            _swap_sequential_pairs(parent.out, fuse=True)
    return module
