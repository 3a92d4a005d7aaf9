"""The LDM BERT transformer (ldm_engine.models.bert) in its three on-disk forms, onto the reference layout:

    original single file   cond_stage_model.transformer.{token_emb, pos_emb.emb, attn_layers.layers.N.{0,1}.*, norm}
                           (+ to_logits, the unused language-model head, dropped)
    diffusers folder       bert/ (LDMBertModel): model.{embed_tokens, embed_positions, layers.i.{self_attn_layer_norm,
                           self_attn.{q,k,v,out}_proj, final_layer_norm, fc1, fc2}, layer_norm}, to_logits (dropped)
    original YAML          cond_stage_config: ldm.modules.encoders.modules.BERTEmbedder {n_embed, n_layer,
                           vocab_size, max_seq_len, use_tokenizer}

and the model-level settings each released BERT-conditioned model was trained with, for detection from keys.
"""
from __future__ import annotations

import re

import torch

from ..models.configs import AutoencoderConfig, BERTConfig, ScheduleConfig
from .errors import CheckpointError

PREFIX = "cond_stage_model.transformer."
TEXT_LENGTH = 77  # the original BERTTokenizer pads to max_seq_len = 77; the layout model's 92 tokens differ
_DIFFUSERS_LAYER = {"self_attn_layer_norm": "0.0", "self_attn.q_proj": "0.1.to_q", "self_attn.k_proj": "0.1.to_k",
                    "self_attn.v_proj": "0.1.to_v", "self_attn.out_proj": "0.1.to_out", "final_layer_norm": "1.0",
                    "fc1": "1.1.net.0.0", "fc2": "1.1.net.2"}


def has_bert(sd: dict[str, torch.Tensor]) -> bool:
    """Whether an original single file's conditioning stage is the BERT transformer."""
    return PREFIX + "token_emb.weight" in sd


def original_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`cond_stage_model.transformer.`-stripped keys: already the reference names, less the logits head."""
    return {k: v for k, v in sd.items() if not k.startswith("to_logits.")}


def ldmbert_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' LDMBertModel state dict -> the reference (original) names. Layer i's attention half is entry
    2i of attn_layers.layers, its feed-forward half entry 2i+1."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("model.")
        if m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key):
            i, name, kind = int(m[1]), m[2], m[3]
            if name not in _DIFFUSERS_LAYER:
                raise CheckpointError(f"LDMBertModel key {key!r} has no counterpart in the LDM BERT transformer")
            half, rest = _DIFFUSERS_LAYER[name].split(".", 1)
            out[f"attn_layers.layers.{2 * i + int(half)}.{rest}.{kind}"] = value
        elif key.startswith("embed_tokens."):
            out["token_emb." + key[len("embed_tokens."):]] = value
        elif key.startswith("embed_positions."):
            out["pos_emb.emb." + key[len("embed_positions."):]] = value
        elif key.startswith("layer_norm."):
            out["norm." + key[len("layer_norm."):]] = value
        elif not key.startswith("to_logits."):
            out[key] = value  # left for load_strict to name as unexpected
    return out


def _need(sd, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"cannot detect the BERT transformer: key {key!r} is missing")
    return sd[key]


def detect_bert(sd: dict[str, torch.Tensor]) -> BERTConfig:
    """The config of reference-named BERT weights. The original always runs 8 heads (x-transformers' default),
    so the head width is the q projection's rows / 8. A sequence of 77 is text (word pieces); another length
    of 3·n + 2 is the layout model (n objects of three tokens, then two crop tokens)."""
    vocab, width = _need(sd, "token_emb.weight").shape
    length = _need(sd, "pos_emb.emb.weight").shape[0]
    layers = len({int(m[1]) for k in sd if (m := re.match(r"attn_layers\.layers\.(\d+)\.", k))})
    if layers == 0 or layers % 2:
        raise CheckpointError(f"cannot detect the BERT transformer: {layers} attention-layer entries (expected an "
                              "attention and a feed-forward entry per layer)")
    inner = _need(sd, "attn_layers.layers.0.1.to_q.weight").shape[0]
    if inner % 8:
        raise CheckpointError(f"cannot detect the BERT transformer: attention width {inner} is not 8 heads; pass "
                              "config= with the right BERTConfig")
    layout = length != TEXT_LENGTH and (length - 2) % 3 == 0
    ff = _need(sd, "attn_layers.layers.1.1.net.0.0.weight").shape[0]
    return BERTConfig(vocab_size=vocab, max_length=length, width=width, layers=layers // 2, heads=8,
                      head_dim=inner // 8, intermediate_size=ff, tokenizer=not layout)


def config_from_ldmbert(c: dict, where: str) -> BERTConfig:
    """A diffusers `bert/config.json` (LDMBertConfig) -> BERTConfig."""
    if c.get("model_type", "ldmbert") != "ldmbert":
        raise CheckpointError(f"{where}: text encoder type {c.get('model_type')!r} is not LDMBert")
    if c.get("activation_function", "gelu") != "gelu":
        raise CheckpointError(f"{where}: LDMBert activation {c.get('activation_function')!r} is not supported "
                              "(the LDM transformer uses exact GELU)")
    try:
        return BERTConfig(vocab_size=c.get("vocab_size", 30522), max_length=c.get("max_position_embeddings", 77),
                          width=c.get("d_model", 1280), layers=c.get("encoder_layers", 32),
                          heads=c.get("encoder_attention_heads", 8), head_dim=c.get("head_dim", 64),
                          intermediate_size=c.get("encoder_ffn_dim", 5120))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed LDMBert config ({e})") from None


def config_from_yaml(params: dict, cond_stage_key: str | None = None) -> BERTConfig:
    """The original BERTEmbedder's params -> BERTConfig (`use_tokenizer: false` or the `coordinates_bbox`
    key: the layout model, whose ids are bounding-box tokens)."""
    layout = not params.get("use_tokenizer", True) or cond_stage_key == "coordinates_bbox"
    return BERTConfig(vocab_size=params.get("vocab_size", 30522), max_length=params.get("max_seq_len", 77),
                      width=params["n_embed"], layers=params["n_layer"], tokenizer=not layout)


def model_settings(text: BERTConfig, vae: AutoencoderConfig) -> dict:
    """LDMConfig fields that the weights do not store, as the released BERT-conditioned models have them
    (their YAMLs): txt2img-f8-large (KL-f8), the Conceptual Captions text2img256 (VQ-f4), layout2img."""
    if not text.tokenizer:
        return dict(conditioning="layout", task="layout", scale_factor=1.0, sample_size=64, guidance_scale=1.0,
                    schedule=ScheduleConfig(beta_start=0.0015, beta_end=0.0205))
    if vae.kind == "kl":
        return dict(conditioning="text", task="txt2img", scale_factor=0.18215, sample_size=32, guidance_scale=1.0,
                    schedule=ScheduleConfig())
    return dict(conditioning="text", task="txt2img", scale_factor=1.0, sample_size=64, guidance_scale=1.0,
                schedule=ScheduleConfig(beta_start=0.0015, beta_end=0.0195))
