"""`load_checkpoint`: original single-file checkpoints and diffusers folders -> reference modules."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import (BERTConfig, BERTEncoder, ClassEmbedder, CLIPTextEncoder, CLIPTokenizer, LDMConfig, UNetModel,
                      WordPieceTokenizer, build_autoencoder, get_preset)
from ..models.configs import ScheduleConfig, from_dict
from ..models.tokenizer import read_bpe_files
from . import bert_keys
from . import diffusers_config as dc
from .detect import detect_config
from .errors import CheckpointError
from .export import CONFIG_KEY
from .files import read_json, read_metadata, read_state_dict
from .keymaps import diffusers_unet_to_original, diffusers_vae_to_original, ema_weights, openclip_text_to_reference
from .concat_models import build_cond_stage, refine_detected, schedule_from_betas
from .modules import load_strict
from .unet2d import unet2d_folder
from .yaml_config import config_from_yaml

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """The components of one latent diffusion model, as plain nn.Modules in eval mode."""
    config: LDMConfig
    unet: UNetModel
    vae: nn.Module
    text_encoder: CLIPTextEncoder | BERTEncoder | None  # BERTEncoder: the LDM text-to-image and layout models
    tokenizer: CLIPTokenizer | WordPieceTokenizer | None
    class_embedder: ClassEmbedder | None
    source: Path
    # a conditioning stage run on an image-like input before sampling (e.g. semantic synthesis's
    # SpatialRescaler over a one-hot label map); plain torch on every backend, it runs once per call
    cond_stage: nn.Module | None = None

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def schedule(self) -> ScheduleConfig:
        return self.config.schedule


def resolve_config(config) -> LDMConfig | None:
    if config is None or isinstance(config, LDMConfig):
        return config
    if isinstance(config, (str, Path)) and Path(config).suffix in (".yaml", ".yml"):
        if not Path(config).is_file():
            raise CheckpointError(f"{config}: no such YAML config")
        return config_from_yaml(config)
    if isinstance(config, str):
        return get_preset(config)
    raise TypeError(f"config must be None, a preset name, a YAML path or an LDMConfig, got {type(config).__name__}")


def load_checkpoint(path: str | Path, config=None, use_ema: bool = True,
                    dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None) -> LoadedModel:
    """Load a model from an original single file (.safetensors/.ckpt/.pt) or a diffusers folder.

    `config`: None (detect from key names and shapes, or read the folder's configs), a preset name
    (`sd-1.5`, `sd-2.1-v`, ...), a path to an original inference YAML, or an LDMConfig.
    `use_ema`: take the EMA copy of the UNet weights when the file has one.
    `tokenizer`: the tokenizer's files when not the default ones (a diffusers folder's tokenizer/, else the
    vocabulary a dependency ships): a BERT `vocab.txt` / `tokenizer.json` (LDM text-to-image models) or a
    CLIP folder with vocab.json and merges.txt, or a BPE tokenizer.json (what transformers 5 saves).
    """
    path = Path(path)
    cfg = resolve_config(config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path}: a folder must be a diffusers model folder with model_index.json")
        return _load_diffusers(path, cfg, dtype, tokenizer)
    return _load_single_file(path, cfg, use_ema, dtype, tokenizer)


# ---- original single files -----------------------------------------------------------------------

def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _config_in_file(path: Path) -> LDMConfig | None:
    """The LDMConfig a file written by save_single_file carries in its metadata."""
    text = read_metadata(path).get(CONFIG_KEY)
    if text is None:
        return None
    try:
        return from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: malformed {CONFIG_KEY} metadata ({e})") from None


def _load_single_file(path: Path, cfg: LDMConfig | None, use_ema: bool, dtype, tokenizer=None) -> LoadedModel:
    sd = read_state_dict(path)
    cfg = cfg or _config_in_file(path)
    unet_sd = _strip(sd, "model.diffusion_model.")
    if not unet_sd:
        sample = ", ".join(list(sd)[:3])
        raise CheckpointError(f"{path}: not a latent-diffusion checkpoint: no 'model.diffusion_model.*' keys "
                              f"(found e.g. {sample}). For a diffusers component, load its whole model folder.")
    if use_ema and (ema := ema_weights(sd)):
        unet_sd = _strip(ema, "model.diffusion_model.")
        log.info("using the EMA weights of %s", path.name)
    vae_sd = {k: v for k, v in _strip(sd, "first_stage_model.").items() if not k.startswith("loss.")}
    openclip = any(k.startswith("cond_stage_model.model.") for k in sd)
    if openclip:
        text_sd = openclip_text_to_reference(_strip(sd, "cond_stage_model.model."))
    elif bert_keys.has_bert(sd):  # the LDM BERT transformer: text-to-image or layout
        text_sd = bert_keys.original_to_reference(_strip(sd, bert_keys.PREFIX))
    else:
        prefix = ("cond_stage_model.transformer.text_model." if any(k.startswith("cond_stage_model.transformer.text_model.")
                                                                 for k in sd) else "cond_stage_model.transformer.")
        text_sd = _strip(sd, prefix)
    text_sd.pop("embeddings.position_ids", None)
    class_sd = _strip(sd, "cond_stage_model.embedding.")
    class_sd = {"embedding." + k: v for k, v in class_sd.items()}
    if depth_keys := sum(k.startswith("depth_model.") for k in sd):  # depth-to-image: the caller gives depth_map=
        log.info("%s: ignoring its %d depth_model.* tensors (the MiDaS depth estimator); pass depth_map= to the "
                 "pipeline instead", path.name, depth_keys)
    if cfg is None:
        if not vae_sd:
            raise CheckpointError(f"{path}: no autoencoder weights ('first_stage_model.*'); cannot detect the model")
        cfg = detect_config(unet_sd, vae_sd, text_sd, openclip, class_sd, name=path.stem)
        cfg = refine_detected(cfg, sd)  # super-resolution, semantic synthesis, LDM inpainting
        if bert_keys.has_bert(sd) and "betas" in sd:  # the file's DDPM buffer records the training schedule
            cfg.schedule = schedule_from_betas(sd["betas"], (cfg.schedule.beta_start, cfg.schedule.beta_end))
    if "scale_factor" in sd and sd["scale_factor"].numel() == 1:  # trained with scale_by_std: the file knows best
        cfg = cfg.replace(scale_factor=float(sd["scale_factor"]))
    model = _assemble(cfg, unet_sd, vae_sd, text_sd, class_sd, tokenizer, path, dtype)
    model.cond_stage = build_cond_stage(cfg, sd, path, dtype)  # semantic synthesis's SpatialRescaler
    return model


def _assemble(cfg: LDMConfig, unet_sd, vae_sd, text_sd, class_sd, tokenizer_dir, source, dtype) -> LoadedModel:
    unet = load_strict(lambda: UNetModel(cfg.unet), unet_sd, "UNet", source, dtype)
    vae = load_strict(lambda: build_autoencoder(cfg.vae), vae_sd, "autoencoder", source, dtype)
    text_encoder = tokenizer = class_embedder = None
    if isinstance(cfg.text_encoder, BERTConfig) and cfg.conditioning in ("text", "layout"):
        text_encoder = load_strict(lambda: BERTEncoder(cfg.text_encoder), text_sd, "BERT transformer", source, dtype)
        if cfg.text_encoder.tokenizer:  # the layout model reads bounding-box tokens, no text
            tokenizer = WordPieceTokenizer(tokenizer_dir, max_length=cfg.text_encoder.max_length)
    elif cfg.conditioning == "text":
        text_encoder = load_strict(lambda: CLIPTextEncoder(cfg.text_encoder), text_sd, "text encoder", source, dtype)
        tokenizer = CLIPTokenizer(tokenizer_dir, max_length=cfg.text_encoder.max_length,
                                  pad_token_id=cfg.text_encoder.pad_token_id)
    elif cfg.conditioning == "class":
        dim = cfg.unet.context_dim
        class_embedder = load_strict(lambda: ClassEmbedder(cfg.num_classes, dim), class_sd, "class embedder", source, dtype)
    return LoadedModel(cfg, unet, vae, text_encoder, tokenizer, class_embedder, Path(source))


# ---- diffusers folders ---------------------------------------------------------------------------

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


def _component(folder: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    sub = folder / name
    cfg_file = sub / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{sub}: missing config.json")
    config = read_json(cfg_file)
    for w in _WEIGHT_NAMES:
        if (sub / w).is_file():
            return config, read_state_dict(sub / w)
    raise CheckpointError(f"{sub}: no weights file (looked for {', '.join(_WEIGHT_NAMES)})")


def _load_diffusers(folder: Path, cfg: LDMConfig | None, dtype, tokenizer=None) -> LoadedModel:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'model_index.json'}: not valid JSON ({e})") from None
    unet_c, unet_sd = _component(folder, "unet")
    vae_name = "vae" if "vae" in index else "vqvae"
    vae_class = (index.get(vae_name) or [None, "AutoencoderKL"])[1]
    if vae_class not in ("AutoencoderKL", "VQModel"):
        raise CheckpointError(f"{folder}: autoencoder class {vae_class!r} is not supported")
    vae_c, vae_sd = _component(folder, vae_name)
    unet_class = (index.get("unet") or [None, None])[1]
    if unet_class == "UNet2DModel":  # LDM super-resolution: the ADM UNet without cross-attention (loading/unet2d.py)
        cfg, unet_sd, vae_sd = unet2d_folder(folder, index, cfg, unet_c, unet_sd, vae_c, vae_sd, vae_name, vae_class)
        return _assemble(cfg, unet_sd, vae_sd, {}, {}, None, folder, dtype)
    if unet_class != "UNet2DConditionModel":
        raise CheckpointError(f"{folder}: UNet class {unet_class!r} is not supported (UNet2DConditionModel is)")
    ucfg = dc.unet_config(unet_c, str(folder / "unet"))
    vcfg, scale = dc.vae_config(vae_c, str(folder / vae_name), "vq" if vae_class == "VQModel" else "kl")
    text_sd, text_cfg, tok_dir = {}, None, None
    if index.get("text_encoder") and index["text_encoder"][0] is not None:
        text_c, raw = _component(folder, "text_encoder")
        # transformers < 5 saves keys under `text_model.`, transformers 5 without it
        text_sd = {k.removeprefix("text_model."): v for k, v in raw.items()}
        text_sd.pop("embeddings.position_ids", None)
        tok_dir = folder / "tokenizer"
        text_cfg = dc.text_encoder_config(text_c, str(folder / "text_encoder"), _pad_id(tok_dir))
    elif index.get("bert") and index["bert"][0] is not None:  # LDMTextToImagePipeline: LDMBertModel + BertTokenizer
        bert_c, raw = _component(folder, "bert")
        text_sd = bert_keys.ldmbert_to_reference(raw)
        text_cfg = bert_keys.config_from_ldmbert(bert_c, str(folder / "bert"))
        tok_dir = folder / "tokenizer"
    tok_dir = tokenizer if tokenizer is not None else tok_dir
    sched_file = folder / "scheduler" / "scheduler_config.json"
    schedule, pred = (dc.schedule_config(json.loads(sched_file.read_text()), index.get("_class_name"))
                      if sched_file.is_file() else (ScheduleConfig(), "eps"))
    n = len(ucfg.channel_mult)
    unet_sd = diffusers_unet_to_original(unet_sd, ucfg.num_res_blocks,
                                         [2 ** (n - 1 - i) in ucfg.attention_resolutions for i in range(n)])
    vae_sd = diffusers_vae_to_original(vae_sd, len(vcfg.ch_mult))
    if (index.get("depth_estimator") or [None])[0] is not None:  # depth-to-image: the caller gives depth_map=
        log.info("%s: ignoring its depth_estimator and feature_extractor; pass depth_map= to the pipeline", folder)
    if cfg is None:
        task = {9: "inpaint", 7: "upscale", 5: "depth"}.get(ucfg.in_channels, "txt2img")
        cfg = LDMConfig(name=folder.name, unet=ucfg, vae=vcfg, text_encoder=text_cfg,
                        conditioning="text" if text_cfg else "none", scale_factor=scale, prediction_type=pred,
                        schedule=schedule, sample_size=_sample_size(unet_c), task=task if text_cfg else "unconditional",
                        max_noise_level=int(index.get("max_noise_level", 350)),
                        guidance_scale=1.0 if isinstance(text_cfg, BERTConfig) else 7.5)  # as LDMTextToImagePipeline
        if task == "upscale" and scale == 0.18215:  # the x4 upscaler's VAE runs at 0.08333, as diffusers assumes
            log.warning("%s: upscaler autoencoder with scaling_factor 0.18215; using 0.08333", folder)
            cfg.scale_factor = 0.08333
        if sched_file.is_file():
            sched_c = json.loads(sched_file.read_text())
            own = dc.sampler_for_scheduler(sched_c)
            if own is None:
                log.info("%s: its %s has no matching sampler here; calls default to ddim", folder,
                         sched_c.get("_class_name"))
            cfg.default_sampler = own or "ddim"
        low_res = folder / "low_res_scheduler" / "scheduler_config.json"
        if low_res.is_file():
            cfg.noise_aug_schedule = dc.schedule_config(json.loads(low_res.read_text()))[0]
    return _assemble(cfg, unet_sd, vae_sd, text_sd, {}, tok_dir, folder, dtype)


def _sample_size(unet_c: dict) -> int:
    s = unet_c.get("sample_size") or 64
    return s if isinstance(s, int) else s[0]


def _pad_id(tok_dir: Path) -> int:
    """The id of the folder tokenizer's pad token: SD1 folders pad with the end token, SD2 folders
    with '!' (id 0 in the CLIP vocabulary, as OpenCLIP pads)."""
    try:
        vocab, _ = read_bpe_files(tok_dir)
    except FileNotFoundError as e:
        raise CheckpointError(f"{tok_dir}: {e} (the tokenizer files of a diffusers folder)") from e
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = tok_dir / name
        if f.is_file():
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad in vocab:
                return vocab[pad]
    return vocab["<|endoftext|>"]


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A model of the given architecture (preset name, YAML or LDMConfig) with random weights: for
    benchmarks, whose timings do not depend on weight values, and for tests."""
    cfg = resolve_config(config)
    if cfg is None:
        raise ValueError("random_model needs an architecture: a preset name, a YAML path or an LDMConfig")
    torch.manual_seed(seed)
    text_encoder = tokenizer = class_embedder = None
    if isinstance(cfg.text_encoder, BERTConfig) and cfg.conditioning in ("text", "layout"):
        text_encoder = BERTEncoder(cfg.text_encoder)
        if cfg.text_encoder.tokenizer:
            tokenizer = WordPieceTokenizer(None, max_length=cfg.text_encoder.max_length)
    elif cfg.conditioning == "text":
        text_encoder = CLIPTextEncoder(cfg.text_encoder)
        tokenizer = CLIPTokenizer(None, max_length=cfg.text_encoder.max_length, pad_token_id=cfg.text_encoder.pad_token_id)
    elif cfg.conditioning == "class":
        class_embedder = ClassEmbedder(cfg.num_classes, cfg.unet.context_dim)
    mods = [UNetModel(cfg.unet), build_autoencoder(cfg.vae), text_encoder, class_embedder]
    for m in mods:
        if m is not None:
            m.to(dtype).eval().requires_grad_(False)
    return LoadedModel(cfg, mods[0], mods[1], text_encoder, tokenizer, class_embedder, Path(f"<random {cfg.name}>"),
                       cond_stage=build_cond_stage(cfg, None, cfg.name, dtype))
