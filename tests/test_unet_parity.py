"""The reference UNet matches diffusers' UNet2DConditionModel with the same weights (fp32, <= 1e-4)."""
import pytest
import torch

from conftest import diffusers_unet
from ldm_engine.loading import load_checkpoint
from ldm_engine.loading.diffusers_config import unet_config
from ldm_engine.loading.keymaps import diffusers_unet_to_original
from ldm_engine.loading.modules import load_strict
from ldm_engine.models import UNetModel

TOL = 1e-4


def reference_from_diffusers(model):
    cfg = unet_config(dict(model.config), "test")
    n = len(cfg.channel_mult)
    sd = diffusers_unet_to_original(model.state_dict(), cfg.num_res_blocks,
                                    [2 ** (n - 1 - i) in cfg.attention_resolutions for i in range(n)])
    return load_strict(lambda: UNetModel(cfg), sd, "UNet", "test")


CASES = {
    "sd1": dict(style="sd1"),
    "sd2": dict(style="sd2"),
    "inpaint": dict(style="sd1", in_channels=9),
    "class_conditional": dict(style="sd1", num_class_embeds=10),
    "upscaler_like": dict(style="sd2", in_channels=7, num_class_embeds=1000, only_cross_attention=[True, False]),
    "depth2": dict(style="sd2", transformer_layers_per_block=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hw", [(8, 8), (8, 16)], ids=["square", "nonsquare"])
def test_unet_matches_diffusers(case, hw):
    kw = dict(CASES[case])
    ref = diffusers_unet(kw.pop("style"), **kw)
    ours = reference_from_diffusers(ref)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, ref.config.in_channels, *hw, generator=g)
    t = torch.tensor([3, 917])
    ctx = torch.randn(2, 77, 32, generator=g)
    labels = torch.tensor([1, 7]) if ref.config.num_class_embeds else None
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = ours(x, t, ctx, class_labels=labels)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_scalar_timestep_broadcasts():
    ours = reference_from_diffusers(diffusers_unet("sd1"))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 500, ctx), ours(x, torch.tensor([500, 500]), ctx))


def test_missing_context_is_a_clear_error():
    ours = reference_from_diffusers(diffusers_unet("sd1"))
    with pytest.raises(ValueError, match="pass context"):
        ours(torch.randn(1, 4, 8, 8), 1)


def test_missing_class_labels_is_a_clear_error():
    ours = reference_from_diffusers(diffusers_unet("sd1", num_class_embeds=10))
    with pytest.raises(ValueError, match="class_labels"):
        ours(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32))


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_diffusers_folder_unet(style, sd1_folder, sd2_folder):
    folder = sd1_folder if style == "sd1" else sd2_folder
    model = load_checkpoint(folder)
    ref = diffusers_unet(style)
    x, ctx = torch.randn(1, 4, 16, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        diff = (model.unet(x, 250, ctx) - ref(x, 250, encoder_hidden_states=ctx).sample).abs().max()
    assert diff <= TOL
    assert model.prediction_type == ("eps" if style == "sd1" else "v")


@pytest.mark.slow
def test_full_size_sd15_unet_matches_diffusers():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()  # SD-1.5's architecture
    ours = reference_from_diffusers(ref)
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768)
    with torch.no_grad():
        diff = (ours(x, torch.tensor([1, 999]), ctx) - ref(x, torch.tensor([1, 999]), encoder_hidden_states=ctx).sample)
    assert diff.abs().max().item() <= TOL
