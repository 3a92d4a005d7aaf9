"""The reference CLIP text encoder matches transformers' CLIPTextModel (fp32, <= 1e-4): SD1's last
hidden state, and SD2's penultimate layer + final LayerNorm from an OpenCLIP-layout file."""
import pytest
import torch

from conftest import hf_text_encoder
from ldm_engine.loading.detect import detect_text_encoder
from ldm_engine.loading.keymaps import openclip_text_to_reference
from ldm_engine.loading.modules import load_strict
from ldm_engine.models import CLIPTextEncoder

TOL = 1e-4


def ids(batch=2, length=77, seed=0):
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_to_openclip(sd):
    """Write a transformers CLIP text state dict in OpenCLIP's layout (fused in_proj, ln_1, c_fc, ...)."""
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": torch.zeros(32, 32)}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[q + f"{b}.{kind}"] = sd[p + f"{a}.{kind}"]
    return out


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
