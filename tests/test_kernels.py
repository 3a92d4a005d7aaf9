"""Triton kernels against their torch references, run on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py when no GPU is present). fp32 max abs <= 1e-4."""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from ldm_engine.kernels import flash_attention, group_norm  # noqa: E402

TOL = 1e-4


def _qkv(b, h, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk))


@pytest.mark.parametrize("b, h, nq, nk, d", [
    (1, 2, 64, 64, 64),      # self-attention, aligned
    (2, 1, 100, 100, 40),    # odd length, SD1 head dim at 320 channels / 8 heads
    (1, 2, 77, 77, 80),      # 77 tokens, head dim 80
    (2, 2, 96, 77, 160),     # cross-attention on a 77-token context, head dim 160
    (1, 1, 33, 77, 256),     # the largest supported head dim
    (1, 3, 50, 17, 24),      # small odd everything
])
def test_flash_attention_fp32(b, h, nq, nk, d):
    q, k, v = _qkv(b, h, nq, nk, d)
    torch.testing.assert_close(flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=TOL, rtol=0)


def test_flash_attention_long_self_attention():
    q, k, v = _qkv(1, 1, 4096, 4096, 64)  # 64x64 latents: the SD 512px self-attention length
    torch.testing.assert_close(flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=TOL, rtol=0)


def test_flash_attention_custom_scale_and_strided_inputs():
    q, k, v = _qkv(2, 2, 40, 30, 32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) memory, as projections produce
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(flash_attention(qt, k, v, scale=0.3), expected, atol=TOL, rtol=0)


def test_flash_attention_fp16():
    q, k, v = _qkv(1, 2, 70, 77, 64, dtype=torch.float16)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(flash_attention(q, k, v).float(), expected, atol=2e-3, rtol=0)


def test_flash_attention_bad_input():
    q, k, v = _qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="share batch, heads"):
        flash_attention(q, k[:, :, :, :8], v)
    with pytest.raises(ValueError, match="head dim 300"):
        flash_attention(*_qkv(1, 1, 8, 8, 300))
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        flash_attention(q[0], k, v)


@pytest.mark.parametrize("n, c, hw", [(1, 64, (8, 8)), (2, 320, (6, 5)), (1, 640, (4, 4)), (2, 1280, (3, 3))])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_fp32(n, c, hw, silu, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, *hw, generator=g) * 3 + 1
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(x, 32, w, b, 1e-6)
    expected = F.silu(expected) if silu else expected
    got = group_norm(x, 32, w, b, 1e-6, silu=silu)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_group_norm_fp16_and_bad_input():
    x = torch.randn(1, 64, 4, 4).half()
    w, b = torch.ones(64).half(), torch.zeros(64).half()
    torch.testing.assert_close(group_norm(x, 32, w, b, 1e-5, silu=True).float(),
                               F.silu(F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)), atol=4e-3, rtol=0)
    with pytest.raises(ValueError, match="do not split into 32 groups"):
        group_norm(torch.randn(1, 48, 2, 2), 32)


# ---- the swap into the reference modules ---------------------------------------------------------

def test_swapped_unet_and_vae_match_the_reference(sd1_folder):
    from ldm_engine import load_checkpoint
    from ldm_engine.optimize import use_triton_kernels

    ref, fast = load_checkpoint(sd1_folder), load_checkpoint(sd1_folder)
    use_triton_kernels(fast.unet)
    use_triton_kernels(fast.vae)
    assert any(type(m).__name__ == "KernelCrossAttention" for m in fast.unet.modules())
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.unet(x, 500, ctx), ref.unet(x, 500, ctx), atol=TOL, rtol=0)
        z = torch.randn(1, 4, 6, 6)
        torch.testing.assert_close(fast.vae.decode(z), ref.vae.decode(z), atol=TOL, rtol=0)
        img = torch.rand(1, 3, 12, 12) * 2 - 1
        torch.testing.assert_close(fast.vae.encode(img).mean, ref.vae.encode(img).mean, atol=TOL, rtol=0)


def test_swapped_ldm_unet_with_adm_attention_and_scale_shift():
    from ldm_engine.models import UNetModel
    from ldm_engine.models.configs import UNetConfig
    from ldm_engine.optimize import use_triton_kernels

    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
                     num_head_channels=8, context_dim=None, use_spatial_transformer=False, use_scale_shift_norm=True,
                     resblock_updown=True, norm_groups=8)
    torch.manual_seed(0)
    ref = UNetModel(cfg).eval()
    fast = UNetModel(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    use_triton_kernels(fast)
    use_triton_kernels(fast)  # idempotent
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 10), ref(x, 10), atol=TOL, rtol=0)


def test_backend_option(sd1_folder):
    from ldm_engine import Pipeline

    pipe = Pipeline.from_pretrained(sd1_folder, kernels="triton")
    assert pipe.backend.kernels == "triton"
    with pytest.raises(ValueError, match="kernels must be"):
        Pipeline.from_pretrained(sd1_folder, kernels="cuda")
