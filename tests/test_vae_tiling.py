"""Tiled decode / encode: exact for local maps, equal to the full decode when one tile covers all."""
import pytest
import torch
import torch.nn.functional as F

from ldm_engine import Pipeline
from ldm_engine.vae_tiling import decode_tiled, encode_tiled


def upsample(z):  # a purely local "decoder": tiling must reproduce it exactly
    return F.interpolate(z[:, :3], scale_factor=4, mode="nearest")


@pytest.mark.parametrize("hw", [(40, 40), (37, 53), (16, 100)])
def test_tiled_decode_of_a_local_map_is_exact(hw):
    z = torch.randn(2, 4, *hw)
    torch.testing.assert_close(decode_tiled(upsample, z, 4, tile=16, overlap=6), upsample(z))


def test_tiled_encode_of_a_local_map_is_exact():
    image = torch.randn(1, 3, 64, 96)
    mean = lambda x: F.avg_pool2d(x, 8)
    torch.testing.assert_close(encode_tiled(mean, image, 8, 3, tile=32, overlap=16), mean(image))


def test_one_tile_equals_full_decode(sd1_folder):
    pipe = Pipeline.from_pretrained(sd1_folder)
    z = torch.randn(1, 4, 12, 12)
    full = pipe.decode(z)
    pipe.enable_vae_tiling(tile=16, overlap=4)
    torch.testing.assert_close(pipe.decode(z), full)


def test_tiled_pipeline_decode_runs_and_blends(sd1_folder):
    pipe = Pipeline.from_pretrained(sd1_folder)
    z = torch.randn(1, 4, 40, 24)
    full = pipe.decode(z)
    pipe.enable_vae_tiling(tile=16, overlap=8)
    tiled = pipe.decode(z)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    mse = (tiled - full).pow(2).mean()
    assert 10 * torch.log10(4 / mse) > 20  # seams blended: close to the full decode (PSNR over [-1, 1])


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(ValueError, match="overlap"):
        decode_tiled(upsample, torch.randn(1, 4, 40, 40), 4, tile=8, overlap=8)
