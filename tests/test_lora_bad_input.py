"""Every bad LoRA input is one clear LoraError, and the model's weights are bit-for-bit what they were."""
from __future__ import annotations

import os

import pytest
import torch

from test_lora_keys import assert_same_bits, peft_lora, save_tensors, to_kohya, weights

from ldm_engine import Pipeline
from ldm_engine.adapters import LoraError
from ldm_engine.loading import random_model

Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
FF = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"


def pair(name, down=(4, 32), up=(32, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_down.weight": torch.randn(*down, generator=g) * 0.1,
            f"{name}.lora_up.weight": torch.randn(*up, generator=g) * 0.1}


@pytest.fixture()
def pipe():
    return Pipeline(random_model("tiny-sd1", seed=5))


def refused(pipe, path, message, error=LoraError, **kw):
    """Loading `path` raises `error` matching `message`; no weight changed."""
    before = weights(pipe.model)
    with pytest.raises(error, match=message):
        pipe.load_lora(path, **kw)
    assert_same_bits(weights(pipe.model), before)


def test_keys_of_no_module(pipe, tmp_path):
    sd = pair("lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q") | pair("lora_te2_text_model_x")
    refused(pipe, save_tensors(tmp_path / "sdxl.safetensors", sd), r"none of its 2 modules matches a module of this "
                                                                   r"tiny-sd1 model .*another model family")


def test_a_lora_for_another_architecture_names_the_shapes(pipe, tmp_path, sd1_folder):
    """An SD2-style LoRA (wider context, linear projections) on an SD1 model: cross-attention shapes differ."""
    pytest.importorskip("peft")
    from conftest import diffusers_unet

    folder = tmp_path / "sd2wide"
    diffusers_unet("sd2", cross_attention_dim=48).save_pretrained(folder / "unet")
    usd, _, _, _ = peft_lora(folder, text=False, unet_targets=["to_k", "to_v"])
    path = save_tensors(tmp_path / "sd2.safetensors", to_kohya(usd, {}, 4.0, None))
    sd1 = Pipeline.from_pretrained(sd1_folder)
    refused(sd1, path, r"attn2_to_k -> unet\.input_blocks\.1\.1\.transformer_blocks\.0\.attn2\.to_k\.weight: the "
                       r"LoRA's update has shape \(32, 48\) but the model's weight has shape \(32, 32\); the LoRA was "
                       r"made for another architecture")


def test_partly_matching_file_reports_and_needs_strict_false(pipe, tmp_path):
    sd = pair(Q) | pair("lora_unet_middle_block_9_proj_in") | pair("lora_unet_up_blocks_9_resnets_0_conv1")
    path = save_tensors(tmp_path / "part.safetensors", sd)
    refused(pipe, path, r"1 of its 3 modules match this model; unmatched e\.g\. .*pass strict=False")
    name = pipe.load_lora(path, strict=False)
    info = pipe.loras[0]
    assert name == "part" and info["matched"] == 1 and info["modules"] == 3 and len(info["unmatched"]) == 2


def test_nan_or_inf_in_a_tensor(pipe, tmp_path):
    sd = pair(Q)
    sd[f"{Q}.lora_up.weight"][3, 1] = float("nan")
    refused(pipe, save_tensors(tmp_path / "nan.safetensors", sd), r"tensor '.*lora_up\.weight' holds NaN or inf")
    sd = pair(Q) | {f"{Q}.alpha": torch.tensor(float("inf"))}
    refused(pipe, save_tensors(tmp_path / "inf.safetensors", sd), r"\.alpha' holds NaN or inf")


def test_empty_files(pipe, tmp_path):
    (tmp_path / "zero.safetensors").write_bytes(b"")
    refused(pipe, tmp_path / "zero.safetensors", r"zero\.safetensors: not a safetensors file \(only 0 bytes\)")
    refused(pipe, save_tensors(tmp_path / "none.safetensors", {}), "holds no tensors: an empty LoRA file")
    torch.save({}, tmp_path / "none.pt")
    refused(pipe, tmp_path / "none.pt", "holds no tensors")


def test_a_checkpoint_is_not_a_lora(pipe, tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}
    refused(pipe, save_tensors(tmp_path / "model.safetensors", sd),
            r"not a LoRA / LyCORIS file: no lora_down/lora_up.*model checkpoint: load it with "
            r"Pipeline\.from_pretrained")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(pipe, tmp_path):
    torch.save({"x.lora_down.weight": torch.zeros(1), "payload": _RunsCode()}, tmp_path / "evil.pt")
    refused(pipe, tmp_path / "evil.pt", r"refused to load: the pickle asks to run code.*weights_only=True")


def test_unsupported_kinds_and_incomplete_modules(pipe, tmp_path):
    sd = pair(Q) | {"lora_unet_input_blocks_1_1_proj_in.oft_blocks": torch.zeros(4, 8, 8)}
    refused(pipe, save_tensors(tmp_path / "oft.safetensors", sd), r"oft_blocks' belongs to OFT that is not supported")
    sd = {f"{Q}.lora_down.weight": torch.zeros(4, 32)}
    refused(pipe, save_tensors(tmp_path / "half.safetensors", sd), r"is incomplete: missing up")
    sd = {"unet.x.to_q.lora_A.weight": torch.zeros(4, 32), "unet.x.to_q.lora_B.weight": torch.zeros(32, 4),
          "unet.x.to_q.lora_B.bias": torch.zeros(32)}
    refused(pipe, save_tensors(tmp_path / "bias.safetensors", sd), "LoRA with bias terms is not supported")


def test_dora_magnitude_that_fits_no_axis(pipe, tmp_path):
    sd = pair(Q) | {f"{Q}.dora_scale": torch.ones(7, 1)}
    refused(pipe, save_tensors(tmp_path / "dora.safetensors", sd), r"DoRA magnitude of shape \(7, 1\) fits neither")


def test_overflow_rolls_back_to_the_previous_state(tmp_path):
    """A scale too large for the weights' precision: refused, and an earlier LoRA stays exactly as merged."""
    p = Pipeline(random_model("tiny-sd1", seed=5, dtype=torch.float16), dtype=torch.float16)
    p.load_lora(save_tensors(tmp_path / "a.safetensors", pair(Q) | pair(FF, (4, 64), (512, 4), seed=1)), 0.5)
    merged = weights(p.model)
    b = save_tensors(tmp_path / "b.safetensors", pair(Q, seed=2) | pair(FF, (4, 64), (512, 4), seed=3))
    with pytest.raises(LoraError, match=r"b: .* overflows to NaN or inf \(the scale 1e\+39 is too large\)"):
        p.load_lora(b, 1e39)
    assert_same_bits(weights(p.model), merged)
    with pytest.raises(LoraError, match=r"b: .* has NaN or inf in torch\.float16 .*lower the scale"):
        p.load_lora(b, 1e7)  # finite in float32, beyond float16's range only after the cast
    assert_same_bits(weights(p.model), merged)
    assert [e["name"] for e in p.loras] == ["a"]
    with pytest.raises(LoraError, match="scale must be a finite number"):
        p.set_lora_scale("a", float("nan"))
    assert_same_bits(weights(p.model), merged)


def test_missing_file_and_unknown_suffix(pipe, tmp_path):
    refused(pipe, tmp_path / "nope.safetensors", "no such LoRA file")
    (tmp_path / "x.txt").write_text("hello")
    refused(pipe, tmp_path / "x.txt", r"unknown LoRA format '\.txt'")


def test_fixed_onnx_graphs_refuse_before_anything_changes(tmp_path):
    pytest.importorskip("onnxruntime")
    model = random_model("tiny-sd1", seed=5)
    (tmp_path / "graphs").mkdir()
    p = Pipeline(model, "onnxruntime", onnx_dir=tmp_path / "graphs", progress=False)
    refused(p, save_tensors(tmp_path / "a.safetensors", pair(Q)), r"graphs in onnx_dir .* are fixed", ValueError)
