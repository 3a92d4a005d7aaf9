"""Per-image seeds and guidance scales in one batch, the progress callback, A1111's masked content, and
the batch-invariant UNet: what lets a server batch unrelated requests and still give each its own image."""
from __future__ import annotations

import pytest
import torch

from ldm_engine import Pipeline
from ldm_engine.optimize.batch_invariant import make_batch_invariant, restore
from ldm_engine.sampling.noise import generators_for, randn

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.from_pretrained()
    layers = make_batch_invariant(p.model.unet)
    yield p
    restore(layers)


def _run(pipe, **kw):
    args = dict(num_inference_steps=5, guidance_scale=4.0, progress=False, output_type="latent", height=64, width=64)
    args.update(kw)
    return pipe(**args).images


def test_randn_per_sample_generators_equal_solo_draws():
    batch = randn((3, 4, 8, 8), generators_for([5, 6, 7]))
    for i, seed in enumerate((5, 6, 7)):
        solo = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batch[i:i + 1], solo)
    with pytest.raises(ValueError, match="one per sample"):
        randn((2, 4, 8, 8), generators_for([1]))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("scheduler", ["cpp", "python"])
def test_batched_seeds_give_each_image_its_solo_latents(pipe, sampler, scheduler):
    pipe.scheduler = scheduler
    try:
        prompts = [PROMPT, "a green square", PROMPT]
        embeds = [pipe.encode_prompt(p) for p in prompts]
        context = torch.cat([c for c, _ in embeds])
        uncond = torch.cat([u for _, u in embeds])
        batch = _run(pipe, prompt_embeds=context, negative_prompt_embeds=uncond, seed=[1, 2, 3], sampler=sampler)
        for i, seed in enumerate((1, 2, 3)):
            solo = _run(pipe, prompt=prompts[i], seed=seed, sampler=sampler)
            assert torch.equal(batch[i:i + 1], solo), (sampler, i)
    finally:
        pipe.scheduler = "cpp"


def test_per_image_guidance_scales(pipe):
    batch = _run(pipe, prompt=[PROMPT, PROMPT], seed=[4, 4], guidance_scale=[2.0, 6.0])
    for i, g in enumerate((2.0, 6.0)):
        solo = _run(pipe, prompt=PROMPT, seed=4, guidance_scale=g)
        assert (batch[i:i + 1] - solo).abs().max() <= 1e-5  # the native loop's fused CFG vs the same in torch
    with pytest.raises(ValueError, match="one value or one per image"):
        _run(pipe, prompt=[PROMPT, PROMPT], seed=[4, 4], guidance_scale=[2.0, 6.0, 1.0])
    with pytest.raises(ValueError, match="one per image"):
        _run(pipe, prompt=[PROMPT, PROMPT], seed=[4])


def test_batch_invariant_unet_is_exact_and_restorable():
    pipe = Pipeline.from_pretrained()
    unet = pipe.model.unet
    context, _ = pipe.encode_prompt([PROMPT] * 4)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500)
    with torch.no_grad():
        before = unet(x[:1], t[:1], context[:1])
        layers = make_batch_invariant(unet)
        assert layers and make_batch_invariant(unet) == []  # twice is once
        one, four = unet(x[:1], t[:1], context[:1]), unet(x, t, context)
        mixed = unet(x, torch.tensor([500, 10, 990, 500]), context)
        restore(layers)
        after = unet(x[:1], t[:1], context[:1])
    assert torch.equal(one, four[:1])  # batch size no longer changes a sample's bits
    assert torch.equal(mixed[:1], one)  # nor do its neighbours' timesteps
    assert torch.equal(before, after)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_progress_callback_runs_every_step_on_both_loops_and_can_stop(pipe):
    for scheduler in ("cpp", "python"):
        pipe.scheduler = scheduler
        seen = []
        _run(pipe, prompt=PROMPT, seed=1, progress_callback=lambda d, t: seen.append((d, t)))
        assert seen == [(i, 5) for i in range(1, 6)], scheduler

        class Stop(Exception):
            pass

        def stop(done, total):
            if done == 2:
                raise Stop

        with pytest.raises(Stop):
            _run(pipe, prompt=PROMPT, seed=1, progress_callback=stop)
    pipe.scheduler = "cpp"


@pytest.mark.parametrize("content", ["original", "fill", "latent_noise", "latent_nothing"])
def test_masked_content_changes_only_the_masked_start(pipe, content):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    out = _run(pipe, prompt=PROMPT, seed=3, image=image, mask_image=mask, strength=0.6, masked_content=content)
    assert torch.isfinite(out).all()
    base = _run(pipe, prompt=PROMPT, seed=3, image=image, mask_image=mask, strength=0.6)
    right = (slice(None), slice(None), slice(None), slice(out.shape[-1] // 2, None))  # latents outside the mask
    if content == "fill":  # the filled picture is encoded whole: the encoder sees across the mask's edge
        assert (out[right] - base[right]).abs().mean() < 0.1
    else:  # the known region is blended back in every step
        assert torch.equal(out[right], base[right])
    if content != "original":
        assert not torch.equal(out, base)


def test_fill_paints_holes_with_surrounding_colours():
    from ldm_engine.tasks import fill_from_surroundings

    img = torch.zeros(1, 3, 32, 32)
    img[:, 0] = 0.5  # a flat colour
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    filled = fill_from_surroundings(img * (1 - mask) - mask, mask)  # the hole holds garbage (-1)
    assert torch.allclose(filled, img, atol=1e-6)


def test_bad_masked_content_is_refused(pipe):
    from PIL import Image

    with pytest.raises(ValueError, match="masked_content must be one of"):
        _run(pipe, prompt=PROMPT, seed=3, image=Image.new("RGB", (64, 64)), mask_image=Image.new("L", (64, 64), 255),
             masked_content="blur")
