"""Shared fixtures: tiny random-init models built and saved by diffusers / transformers themselves."""
from __future__ import annotations

import json
import os

# Triton kernels run under the interpreter on CPU tensors where there is no GPU; this must be set
# before any kernel is defined.
if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

# a fixed latent-shaped pattern for the stand-in denoiser below
FAKE_PATTERN = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(42), dtype=torch.float64)


def smooth_fake_model(x, t):
    """A smooth stand-in UNet output that depends on x and t and keeps latents O(1): sampler trajectories
    can be compared with diffusers' schedulers without a network."""
    import math

    t = float(t)
    x = x / x.std()
    return (0.9 + 0.05 * math.cos(t / 300.0)) * x + 0.1 * FAKE_PATTERN.to(x.dtype) * math.sin(t / 150.0 + 0.3)


TINY_TEXT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                 vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def diffusers_unet(style: str = "sd1", **overrides):
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    if style == "sd2":  # linear projections, head width fixed (16), attention at every level
        kw.update(use_linear_projection=True, attention_head_dim=(2, 4),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    kw.update(overrides)
    torch.manual_seed(0)
    return UNet2DConditionModel(**kw).eval()


def diffusers_vae(kind: str = "kl"):
    from diffusers import AutoencoderKL, VQModel

    kw = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    torch.manual_seed(1)
    if kind == "kl":
        return AutoencoderKL(latent_channels=4, **kw).eval()
    return VQModel(latent_channels=3, num_vq_embeddings=64, **kw).eval()


def hf_text_encoder(act: str = "quick_gelu", layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    return CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "num_hidden_layers": layers}, hidden_act=act)).eval()


def write_tiny_vocab(folder, pad_token: str = "<|endoftext|>"):
    """A CLIP-format vocab.json/merges.txt trained by the `tokenizers` library on a small corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    corpus = ["a photo of a cat", "a red circle on a blue background", "an astronaut riding a horse on mars",
              "a painting of a fox in the snow, trending on artstation", "green square", "yellow triangle"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.model.save(str(folder))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))
    return folder


def hf_to_openclip(sd: dict, logit_scale: bool = False) -> dict:
    """A transformers (reference-layout) CLIP text state dict written in OpenCLIP's layout (fused in_proj,
    ln_1, c_fc, ...), as original SD2 checkpoints store it; `logit_scale` adds that unused tensor too."""
    w = sd["embeddings.token_embedding.weight"].shape[1]
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": torch.zeros(w, w)}
    if logit_scale:
        out["logit_scale"] = torch.tensor(4.6)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[q + f"{b}.{kind}"] = sd[p + f"{a}.{kind}"]
    return out


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """A diffusers SD1-style folder: tiny UNet, KL VAE, CLIP text encoder, tokenizer, DDIM scheduler."""
    return save_diffusers_folder(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="session")
def sd2_folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("sd2"), "sd2")


@pytest.fixture(scope="session")
def inpaint_folder(tmp_path_factory):
    """A 9-channel inpainting model (SD1 style)."""
    return save_diffusers_folder(tmp_path_factory.mktemp("inpaint"), "sd1", in_channels=9)


@pytest.fixture(scope="session")
def upscaler_folder(tmp_path_factory):
    """An x4-upscaler-style model: 4 latent + 3 image channels, noise level as class input, v-prediction."""
    from diffusers import DDPMScheduler

    root = save_diffusers_folder(tmp_path_factory.mktemp("upscaler"), "sd2", in_channels=7, num_class_embeds=1000)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02).save_pretrained(root / "low_res_scheduler")
    index = json.loads((root / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionUpscalePipeline", "low_res_scheduler": ["diffusers", "DDPMScheduler"],
              "max_noise_level": 350}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def save_diffusers_folder(root, style: str, **unet_overrides):
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    unet = diffusers_unet(style, **unet_overrides)
    vae = diffusers_vae("kl")
    text = hf_text_encoder("quick_gelu" if style == "sd1" else "gelu")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    write_tiny_vocab(root / "tokenizer", pad_token="<|endoftext|>" if style == "sd1" else "!")
    CLIPTokenizer.from_pretrained(str(root / "tokenizer"),
                                  pad_token="<|endoftext|>" if style == "sd1" else "!",
                                  model_max_length=77).save_pretrained(root / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  clip_sample=False, set_alpha_to_one=False,
                  prediction_type="epsilon" if style == "sd1" else "v_prediction").save_pretrained(root / "scheduler")
    import diffusers

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="session", autouse=True)
def _private_artifact_cache(tmp_path_factory):
    """Exports made by the tests go to a fresh cache folder, never the user's."""
    os.environ["LDM_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("artifact_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_sd1():
    from ldm_engine.loading import random_model

    return random_model("tiny-sd1")
