"""The reference CLIP text encoder matches transformers' CLIPTextModel (fp32, <= 1e-4): SD1's last
hidden state, and SD2's penultimate layer + final LayerNorm from an OpenCLIP-layout file."""
import pytest
import torch

from conftest import hf_text_encoder, hf_to_openclip
from ldm_engine.loading.detect import detect_text_encoder
from ldm_engine.loading.keymaps import openclip_text_to_reference
from ldm_engine.loading.modules import load_strict
from ldm_engine.models import CLIPTextEncoder

TOL = 1e-4


def ids(batch=2, length=77, seed=0):
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def _config(sd, openclip):
    cfg = detect_text_encoder(sd, openclip)
    cfg.heads = 2  # head counts leave no trace in the weights; real CLIP widths give 64-wide heads
    return cfg


def _state(model):
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}


@pytest.mark.parametrize("length", [77, 20])
def test_sd1_text_encoder_matches_transformers(length):
    ref = hf_text_encoder("quick_gelu")
    sd = _state(ref)
    ours = load_strict(lambda: CLIPTextEncoder(_config(sd, False)), sd, "text encoder", "test")
    x = ids(length=length)
    with torch.no_grad():
        assert (ours(x) - ref(x).last_hidden_state).abs().max() <= TOL


def test_sd2_openclip_layout_uses_penultimate_layer():
    ref = hf_text_encoder("gelu", layers=4)
    sd = openclip_text_to_reference(hf_to_openclip(_state(ref)))
    cfg = _config(sd, True)
    assert (cfg.act, cfg.output_layer, cfg.pad_token_id, cfg.layers) == ("gelu", -2, 0, 4)
    ours = load_strict(lambda: CLIPTextEncoder(cfg), sd, "text encoder", "test")
    x = ids()
    with torch.no_grad():
        out = ref(x, output_hidden_states=True)
        expected = ref.final_layer_norm(out.hidden_states[-2])
        assert (ours(x) - expected).abs().max() <= TOL


def test_sd2_diffusers_folder_text_encoder(sd2_folder):
    from transformers import CLIPTextModel

    from ldm_engine import load_checkpoint

    model = load_checkpoint(sd2_folder)
    ref = CLIPTextModel.from_pretrained(sd2_folder / "text_encoder").eval()
    x = ids()
    with torch.no_grad():
        assert (model.text_encoder(x) - ref(x).last_hidden_state).abs().max() <= TOL


def test_too_long_ids_are_rejected():
    ref = hf_text_encoder()
    sd = _state(ref)
    ours = load_strict(lambda: CLIPTextEncoder(_config(sd, False)), sd, "text encoder", "test")
    with pytest.raises(ValueError, match="token ids"):
        ours(torch.zeros(1, 78, dtype=torch.long))
