"""One random-weight model written the two ways peers read models: a diffusers folder (diffusers,
optimum-intel, and ldm_engine itself, so every row runs the same weights) and an original-layout single
file (stable-diffusion.cpp). Written once per architecture and latent size, then reused.

The UNet's `sample_size` is the benchmark's latent size: optimum-intel calibrates its int8 hybrid
quantization at that size, as ldm_engine's int8 does at the size it serves.
"""
from __future__ import annotations

from pathlib import Path

import torch

DONE = "complete"  # marker written last: a folder without it was cut off and is rewritten


def diffusers_modules(cfg, dtype=torch.float32, sample_size: int | None = None):
    """(unet, vae, text_encoder, scheduler): diffusers / transformers modules with cfg's architecture and
    random weights (seed 0)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    u = cfg.unet
    levels = len(u.channel_mult)
    attn = [2**i in u.attention_resolutions for i in range(levels)]
    chans = [u.model_channels * m for m in u.channel_mult]
    heads = [u.num_heads if u.num_head_channels == -1 else c // u.num_head_channels for c in chans]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size or cfg.sample_size, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=tuple(chans), layers_per_block=u.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=u.context_dim, attention_head_dim=tuple(heads) if len(set(heads)) > 1 else heads[0],
        use_linear_projection=u.use_linear_in_transformer, norm_num_groups=u.norm_groups)
    v = cfg.vae
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v.embed_dim,
                        block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
                        down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult), norm_num_groups=v.norm_groups,
                        sample_size=(sample_size or cfg.sample_size) * v.downsampling_factor,
                        scaling_factor=cfg.scale_factor)
    t = cfg.text_encoder
    text = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, num_hidden_layers=t.layers,
                                        num_attention_heads=t.heads, intermediate_size=t.intermediate_size,
                                        max_position_embeddings=t.max_length, hidden_act="quick_gelu"))
    s = cfg.schedule
    sched = DDIMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                          beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                          steps_offset=s.steps_offset, timestep_spacing=s.timestep_spacing)
    mods = [m.eval().requires_grad_(False).to(dtype) for m in (unet, vae, text)]
    return mods[0], mods[1], mods[2], sched


def canonical_text_keys(folder: Path) -> None:
    """Rewrite the text encoder's weights under the `text_model.` prefix that released SD folders carry:
    recent transformers saves CLIPTextModel without it, and the older transformers a peer's venv pins then
    finds none of its weights and initializes the encoder at random, without an error."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        sd = load_file(f)
        if not all(k.startswith("text_model.") for k in sd):
            save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}, f,
                      metadata={"format": "pt"})


def write_fixtures(arch: str, latent: int, root: Path, say=print) -> dict[str, Path]:
    """{'diffusers': folder, 'single_file': .safetensors} for `arch` with `sample_size=latent`, under root."""
    from ldm_engine.loading import load_checkpoint
    from ldm_engine.loading.checkpoint import resolve_config
    from ldm_engine.loading.export import save_single_file
    from ldm_engine.models.tokenizer import write_clip_vocab

    folder = Path(root) / f"{arch}-latent{latent}"
    paths = {"diffusers": folder / "diffusers", "single_file": folder / "model.safetensors"}
    if (folder / DONE).is_file():
        return paths
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    say(f"writing the {arch} random-weight model for the peers under {folder} (once)")
    cfg = resolve_config(arch)
    unet, vae, text, sched = diffusers_modules(cfg, sample_size=latent)
    vocab = write_clip_vocab(folder / "vocab")
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=cfg.text_encoder.max_length)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(paths["diffusers"], safe_serialization=True)
    canonical_text_keys(paths["diffusers"] / "text_encoder")
    # the single file is ldm_engine's reading of that folder written back in the original layout, so
    # stable-diffusion.cpp runs the very same weights
    model = load_checkpoint(paths["diffusers"])
    save_single_file(paths["single_file"], model.config, model.unet, model.vae, model.text_encoder)
    (folder / DONE).write_text("ok\n")
    return paths
