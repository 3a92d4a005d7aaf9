"""The reference KL and VQ autoencoders match diffusers' AutoencoderKL / VQModel (fp32, <= 1e-4)."""
import pytest
import torch

from conftest import diffusers_vae
from ldm_engine.loading.diffusers_config import vae_config
from ldm_engine.loading.keymaps import diffusers_vae_to_original
from ldm_engine.loading.modules import load_strict
from ldm_engine.models import build_autoencoder

TOL = 1e-4


def reference_from_diffusers(model, kind):
    cfg, _ = vae_config(dict(model.config), "test", kind)
    sd = diffusers_vae_to_original(model.state_dict(), len(cfg.ch_mult))
    return load_strict(lambda: build_autoencoder(cfg), sd, "autoencoder", "test")


@pytest.mark.parametrize("hw", [(16, 16), (16, 32)], ids=["square", "nonsquare"])
def test_kl_encode_decode(hw):
    ref = diffusers_vae("kl")
    ours = reference_from_diffusers(ref, "kl")
    image = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post_ref, post = ref.encode(image).latent_dist, ours.encode(image)
        assert (post.mean - post_ref.mean).abs().max() <= TOL
        assert (post.mode() - post_ref.mode()).abs().max() <= TOL
        assert (post.std - post_ref.std).abs().max() <= TOL
        z = post.mode()
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() <= TOL


def test_kl_sample_uses_the_generator():
    ours = reference_from_diffusers(diffusers_vae("kl"), "kl")
    with torch.no_grad():
        post = ours.encode(torch.zeros(1, 3, 16, 16))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, post.mean)


@pytest.mark.parametrize("force_not_quantize", [False, True])
def test_vq_encode_decode(force_not_quantize):
    ref = diffusers_vae("vq")
    ours = reference_from_diffusers(ref, "vq")
    image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h_ref, h = ref.encode(image).latents, ours.encode(image).mode()
        assert (h - h_ref).abs().max() <= TOL
        expected = ref.decode(h_ref, force_not_quantize=force_not_quantize).sample
        got = ours.decode(h_ref, force_not_quantize=force_not_quantize)
    assert (got - expected).abs().max() <= TOL


def test_vq_quantize_snaps_to_codebook():
    ours = reference_from_diffusers(diffusers_vae("vq"), "vq")
    z = torch.randn(1, 3, 4, 4)
    q = ours.quantize(z)
    codebook = ours.quantize.embedding.weight
    for vec in q.permute(0, 2, 3, 1).reshape(-1, 3):
        assert torch.isclose(codebook, vec).all(dim=1).any()


def test_encode_rejects_bad_image_shape():
    ours = reference_from_diffusers(diffusers_vae("kl"), "kl")
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.encode(torch.zeros(1, 3, 15, 16))
