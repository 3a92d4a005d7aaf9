"""The shapes dataset, its checker, and the two training stages on tiny configs."""
import random

import torch

from ldm_engine.models.configs import AutoencoderConfig, TextEncoderConfig, UNetConfig
from ldm_engine.training.checker import accuracy, classify
from ldm_engine.training.data import HELD_OUT, PALETTE, SHAPES, TRAIN_TRIPLES, all_triples, render, sample_batch
from ldm_engine.training.stages import train_autoencoder, train_ldm


def test_dataset_split():
    triples = all_triples()
    assert len(triples) == 8 * 7 * 3 and all(c != b for c, _, b in triples)
    assert len(HELD_OUT) == round(0.1 * len(triples)) and not set(HELD_OUT) & set(TRAIN_TRIPLES)
    for c, s, b in HELD_OUT:  # every pair of a held-out triple is seen in training
        assert any(t[0] == c and t[1] == s for t in TRAIN_TRIPLES)
        assert any(t[0] == c and t[2] == b for t in TRAIN_TRIPLES)
        assert any(t[1] == s and t[2] == b for t in TRAIN_TRIPLES)


def test_renders_are_inside_the_frame():
    rng = random.Random(0)
    for shape in SHAPES:
        img = torch.tensor(list(render("red", shape, "blue", rng).getdata())).view(64, 64, 3)
        border = torch.cat([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == torch.tensor(PALETTE["blue"])).all()


def test_checker_is_right_on_real_images():
    images, _, triples = sample_batch(300, random.Random(1), all_triples())
    acc = accuracy(images, triples)
    assert acc == {"colour": 1.0, "shape": 1.0, "background": 1.0}


def test_checker_sees_an_empty_image():
    from PIL import Image

    assert classify(Image.new("RGB", (64, 64), PALETTE["green"])) == {"colour": None, "shape": None, "background": "green"}


def _falls(curve, k=5):
    return sum(curve[-k:]) / k < sum(curve[:k]) / k


def test_training_stages_reduce_their_losses():
    ae_cfg = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=64)
    ae, curve = train_autoencoder(40, batch=4, lr=3e-3, cfg=ae_cfg, log_every=1000)
    assert _falls(curve)
    unet_cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                          num_head_channels=8, context_dim=16, norm_groups=4)
    text_cfg = TextEncoderConfig(width=16, layers=1, heads=2, intermediate_size=32)
    unet, text, curve = train_ldm(ae, 1.0, 40, batch=8, lr=2e-3, pool_size=256, unet_cfg=unet_cfg, text_cfg=text_cfg, log_every=1000)
    assert _falls(curve)
    assert not unet.training and not any(p.requires_grad for p in text.parameters())
