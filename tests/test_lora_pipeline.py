"""The Pipeline's LoRA API: load -> unload restores every weight bit for bit, several LoRAs at once,
set_lora_scale, unloading one by name, pipe.loras; A1111 prompt tags applied for one call only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_lora_keys import assert_same_bits, save_tensors, weights

from ldm_engine import Pipeline
from ldm_engine.adapters import LoraError, extract_lora_tags
from ldm_engine.loading import random_model

Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
FF = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"
CONV = "lora_unet_input_blocks_4_0_in_layers_2"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
KW = dict(height=16, width=16, num_inference_steps=2, guidance_scale=4.0, output_type="np", progress=False)


def lora(seed: int, modules=(Q, FF, CONV, TE)) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {Q: ((4, 32), (32, 4)), FF: ((4, 64), (512, 4)), CONV: ((4, 32, 3, 3), (64, 4, 1, 1)),
              TE: ((4, 32), (32, 4))}
    out = {}
    for m in modules:
        down, up = shapes[m]
        out |= {f"{m}.lora_down.weight": torch.randn(*down, generator=g) * 0.3,
                f"{m}.lora_up.weight": torch.randn(*up, generator=g) * 0.3, f"{m}.alpha": torch.tensor(2.0)}
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    save_tensors(d / "style.safetensors", lora(1))
    save_tensors(d / "detail.safetensors", lora(2, (Q, FF)))
    torch.save(lora(3, (CONV, TE)), d / "legacy.pt")
    return d


@pytest.fixture()
def pipe(loras):
    return Pipeline(random_model("tiny-sd1", seed=4), lora_dirs=[loras])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_then_unload_restores_every_weight_bit_for_bit(loras, dtype):
    p = Pipeline(random_model("tiny-sd1", seed=4, dtype=dtype), dtype=dtype)
    before = weights(p.model)
    p.load_lora(loras / "style.safetensors", 0.8)
    p.load_lora(loras / "detail.safetensors", -0.5, text_encoder_scale=2.0)
    p.set_lora_scale("style", 1.7)
    during = weights(p.model)
    changed = [k for k in before if not torch.equal(before[k], during[k])]
    assert len(changed) == 4 and all(during[k].dtype == dtype for k in changed)
    p.unload_loras()
    assert_same_bits(weights(p.model), before)
    assert p.loras == []


def test_two_loras_add_their_scaled_updates(pipe, loras):
    w0 = weights(pipe.model)
    pipe.load_lora(loras / "style.safetensors", 0.8)
    pipe.load_lora(loras / "detail.safetensors", 0.3)
    w = weights(pipe.model)
    a, b = lora(1), lora(2, (Q, FF))
    for mod, param in ((Q, "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
                       (FF, "unet.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight")):
        da = a[f"{mod}.lora_up.weight"] @ a[f"{mod}.lora_down.weight"] * 0.5  # alpha 2 / rank 4
        db = b[f"{mod}.lora_up.weight"] @ b[f"{mod}.lora_down.weight"] * 0.5
        torch.testing.assert_close(w[param], w0[param] + 0.8 * da + 0.3 * db, atol=1e-6, rtol=0)
    assert [e["name"] for e in pipe.loras] == ["style", "detail"]
    assert pipe.loras[0]["matched"] == pipe.loras[0]["modules"] == 4 and len(pipe.loras[0]["hash"]) == 12


def test_set_scale_and_unload_one_equal_a_fresh_load(pipe, loras):
    pipe.load_lora(loras / "style.safetensors", 0.8)
    pipe.load_lora(loras / "detail.safetensors", 0.3)
    pipe.set_lora_scale("style", 0.25, text_encoder_scale=1.5)
    fresh = Pipeline(random_model("tiny-sd1", seed=4))
    fresh.load_lora(loras / "style.safetensors", 0.25, text_encoder_scale=1.5)
    fresh.load_lora(loras / "detail.safetensors", 0.3)
    assert_same_bits(weights(pipe.model), weights(fresh.model))
    pipe.unload_lora("style")
    only = Pipeline(random_model("tiny-sd1", seed=4))
    only.load_lora(loras / "detail.safetensors", 0.3)
    assert_same_bits(weights(pipe.model), weights(only.model))
    with pytest.raises(LoraError, match="no LoRA named 'style' is loaded; loaded: detail"):
        pipe.set_lora_scale("style", 1.0)


def test_names_are_unique_and_pickles_load_with_weights_only(pipe, loras):
    assert pipe.load_lora(loras / "style.safetensors") == "style"
    assert pipe.load_lora(loras / "style.safetensors", 0.1) == "style_2"
    assert pipe.load_lora(loras / "legacy.pt") == "legacy"
    assert [e["name"] for e in pipe.loras] == ["style", "style_2", "legacy"]


def test_prompt_tags_apply_for_one_call(pipe, loras):
    before = weights(pipe.model)
    tagged = pipe("a red circle <lora:style:0.6>", seed=1, **KW).images
    assert_same_bits(weights(pipe.model), before)  # restored after the call
    assert pipe.adapters.last_call[0]["name"] == "style" and pipe.loras == []
    plain = pipe("a red circle ", seed=1, **KW).images
    pipe.load_lora(loras / "style.safetensors", 0.6)
    loaded = pipe("a red circle ", seed=1, **KW).images
    np.testing.assert_array_equal(tagged, loaded)
    assert np.abs(tagged - plain).max() > 1e-3


def test_tag_order_is_text_encoder_then_unet(pipe, loras):
    """A1111: <lora:NAME:TE:UNET>; te= / unet= by name."""
    seen = []
    pipe("x <lora:style:0.3:0.9>", seed=1, callback=lambda info: seen.append(weights(pipe.model)), **KW)
    ref = Pipeline(random_model("tiny-sd1", seed=4))
    ref.load_lora(loras / "style.safetensors", scale=0.9, text_encoder_scale=0.3)
    assert_same_bits(seen[-1], weights(ref.model))


def test_tags_are_undone_after_an_error(pipe):
    before = weights(pipe.model)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("a cat <lora:style:1> <lora:detail:0.5>", latents=torch.zeros(1, 4, 3, 3), **KW)
    assert_same_bits(weights(pipe.model), before)
    assert pipe.loras == []


def test_unknown_tag_lists_the_folder_and_changes_nothing(pipe):
    before = weights(pipe.model)
    with pytest.raises(LoraError, match=r"no LoRA named 'nope' in .*they hold: detail, legacy, style"):
        pipe("a cat <lora:style:1> <lora:nope:1>", **KW)
    assert_same_bits(weights(pipe.model), before)
    with pytest.raises(LoraError, match="no LoRA folders were given"):
        Pipeline(random_model("tiny-sd1"))("a <lora:style:1>", **KW)


def test_negative_prompts_are_not_searched_for_tags(pipe):
    """As A1111: only the prompt's tags load networks; a negative prompt is encoded as written."""
    before = weights(pipe.model)
    pipe("a cat", negative_prompt="<lora:nope:1>", **KW)
    assert_same_bits(weights(pipe.model), before)


@pytest.mark.parametrize("prompt, clean, tags", [
    ("a cat <lora:foo:0.8>, dog", "a cat , dog", [("foo", 0.8, 0.8)]),
    ("<lora:foo>a", "a", [("foo", 1.0, 1.0)]),
    ("<lora:foo:0.5:1.2>", "", [("foo", 0.5, 1.2)]),
    ("<lora:foo:unet=0.3>", "", [("foo", 1.0, 0.3)]),
    ("<lora:foo:te=0.2:0.9>", "", [("foo", 0.2, 0.2)]),  # positional 0.9 is the te weight, overridden by te=
    ("<lyco:bar:0.7> x <lora:foo:-1>", " x ", [("bar", 0.7, 0.7), ("foo", -1.0, -1.0)]),
    ("<other:thing> (x:1.2)", " (x:1.2)", []),
])
def test_extract_lora_tags(prompt, clean, tags):
    text, found = extract_lora_tags(prompt)
    assert text == clean
    assert [(t.name, t.text_encoder_scale, t.unet_scale) for t in found] == tags


@pytest.mark.parametrize("prompt, message", [
    ("<lora:foo:abc>", "'abc' is not a number"), ("<lora:foo:inf>", "must be finite"),
    ("<hypernet:foo:1>", "hypernetworks are not supported"), ("<lora:foo:1:1:4>", "DyLoRA"),
    ("<lora::1>", "names no LoRA"),
])
def test_bad_tags(prompt, message):
    with pytest.raises(LoraError, match=message):
        extract_lora_tags(prompt)


def test_fused_and_single_updates_of_one_weight_compose(tmp_path):
    """An OpenCLIP in_proj LoRA (q, k, v at once) and a LoRA on q alone: changing either keeps the other."""
    g = torch.Generator().manual_seed(9)
    fused = {"lora_te_transformer_resblocks_0_attn_in_proj.lora_down.weight": torch.randn(2, 32, generator=g),
             "lora_te_transformer_resblocks_0_attn_in_proj.lora_up.weight": torch.randn(96, 2, generator=g)}
    single = {f"{TE}.lora_down.weight": torch.randn(2, 32, generator=g),
              f"{TE}.lora_up.weight": torch.randn(32, 2, generator=g)}
    other = {"lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.randn(2, 32, generator=g),
             "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.randn(32, 2, generator=g)}
    files = {n: save_tensors(tmp_path / f"{n}.safetensors", sd) for n, sd in
             (("fused", fused), ("single", single), ("other", other))}
    p = Pipeline(random_model("tiny-sd1", seed=4))
    for n in ("single", "fused", "other"):
        p.load_lora(files[n], 0.5)
    p.set_lora_scale("other", 2.0)  # touches k only: q (single + fused) must be recomputed with both
    fresh = Pipeline(random_model("tiny-sd1", seed=4))
    fresh.load_lora(files["single"], 0.5)
    fresh.load_lora(files["fused"], 0.5)
    fresh.load_lora(files["other"], 2.0)
    assert_same_bits(weights(p.model), weights(fresh.model))
