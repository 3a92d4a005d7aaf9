"""The LDM text-to-image models (BERT-style transformer over WordPiece ids): parity with diffusers'
LDMTextToImagePipeline (tiny random LDMBertModel, UNet, AutoencoderKL, a tiny WordPiece vocabulary, saved with
save_pretrained), the same weights in the original single-file layout and with an original-style YAML, the
tokenizer against transformers' BertTokenizer, long prompts, the graph backends and ldm-generate."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ldm_engine import Pipeline, load_checkpoint
from ldm_engine.loading import CheckpointError
from ldm_engine.loading.detect import detect_config
from ldm_engine.loading.yaml_config import config_from_yaml
from ldm_engine.models import BERTEncoder, UNetModel, WordPieceTokenizer, build_autoencoder, get_preset
from ldm_engine.models.wordpiece import embedded_vocab

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "on", "in", "photo", "painting", "cat",
         "dog", "red", "blue", "green", "circle", "square", "squirrel", "eat", "##ing", "##s", "##ed", "burger", "cafe",
         "monster", "virus", "guitar", ",", ".", "!", "'", "-", "play", "oil", "canvas", "is", "un", "##aff", "##able",
         "x", "##y", "东", "?"]
PROMPT = "a painting of a squirrel eating a burger"
STEPS, SIZE, GUIDANCE = 3, 64, 5.0
PIXEL_TOL = 2 / 255
TEXT_TOL = 1e-4


# ---- the original module, re-stated: x-transformers' TransformerWrapper + Encoder as BERTEmbedder builds it -----

class OriginalAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, heads * dim_head, bias=False) for _ in range(3))
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3) for t in (self.to_q, self.to_k, self.to_v))
        attn = torch.einsum("bhid,bhjd->bhij", q, k).mul(self.scale).softmax(dim=-1)  # no mask
        return self.to_out(torch.einsum("bhij,bhjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(b, n, -1))


class OriginalFeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class OriginalResidual(nn.Module):  # no weights: keys skip index 2
    def forward(self, out, residual):
        return out + residual


class OriginalTransformer(nn.Module):
    """token_emb, pos_emb.emb, attn_layers.layers[i] = [norm, block, residual] ('a', 'f' alternating), norm,
    to_logits — the module whose state dict the original checkpoints hold under cond_stage_model.transformer."""

    def __init__(self, vocab, length, dim, depth):
        super().__init__()
        self.token_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Module()
        self.pos_emb.emb = nn.Embedding(length, dim)
        self.attn_layers = nn.Module()
        layers = []
        for _ in range(depth):
            layers += [nn.ModuleList([nn.LayerNorm(dim), OriginalAttention(dim), OriginalResidual()]),
                       nn.ModuleList([nn.LayerNorm(dim), OriginalFeedForward(dim), OriginalResidual()])]
        self.attn_layers.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, vocab)

    def forward(self, ids):  # return_embeddings=True
        x = self.token_emb(ids) + self.pos_emb.emb(torch.arange(ids.shape[1]))[None]
        for norm, block, residual in self.attn_layers.layers:
            x = residual(block(norm(x)), x)
        return self.norm(x)


def original_from_ldmbert(bert) -> OriginalTransformer:
    """diffusers' LDMBertModel weights copied into the re-stated original module, name by name."""
    m, c = bert.model, bert.config
    orig = OriginalTransformer(c.vocab_size, c.max_position_embeddings, c.d_model, c.encoder_layers).eval()
    with torch.no_grad():
        orig.token_emb.weight.copy_(m.embed_tokens.weight)
        orig.pos_emb.emb.weight.copy_(m.embed_positions.weight)
        for i, layer in enumerate(m.layers):
            (an, attn, _), (fn, ff, _) = orig.attn_layers.layers[2 * i], orig.attn_layers.layers[2 * i + 1]
            an.load_state_dict(layer.self_attn_layer_norm.state_dict())
            for ours, theirs in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj")):
                getattr(attn, ours).weight.copy_(getattr(layer.self_attn, theirs).weight)
            attn.to_out.load_state_dict(layer.self_attn.out_proj.state_dict())
            fn.load_state_dict(layer.final_layer_norm.state_dict())
            ff.net[0][0].load_state_dict(layer.fc1.state_dict())
            ff.net[2].load_state_dict(layer.fc2.state_dict())
        orig.norm.load_state_dict(m.layer_norm.state_dict())
        orig.to_logits.load_state_dict(bert.to_logits.state_dict())
    return orig


# ---- a tiny diffusers LDMTextToImagePipeline ----------------------------------------------------------------------

def make_diffusers_pipeline(root):
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    (root / "vocab").mkdir(parents=True)
    (root / "vocab" / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(root / "vocab" / "vocab.txt"), model_max_length=77)
    torch.manual_seed(0)  # 8 heads x 64 and a 4x feed-forward, as the original BERTEmbedder at any width
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(WORDS), max_position_embeddings=77, encoder_layers=2,
                                      encoder_ffn_dim=128, encoder_attention_heads=8, head_dim=64, d_model=32)).eval()
    torch.manual_seed(1)  # 32-wide heads: the convention detection assumes below 768-wide contexts; 32 groups
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(1, 2), norm_num_groups=32).eval()
    torch.manual_seed(2)  # f8, as the pipeline's latents (height // 8) assume; 32 groups, as the original's norms
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    # the original DDIM sampler's timesteps (steps_offset 1) and final alpha (set_alpha_to_one False)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(str(root / "folder"))
    return pipe


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    """(folder, diffusers pipeline, its images at guidance 5 and at its default guidance 1)."""
    root = tmp_path_factory.mktemp("ldm_bert")
    pipe = make_diffusers_pipeline(root)
    pipe.set_progress_bar_config(disable=True)
    run = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    guided = pipe(PROMPT, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), **run).images
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **run).images
    return root / "folder", pipe, guided, plain


def bert_ids(pipe, prompts):
    return pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def run(p, prompt=PROMPT, **kw):
    return p(prompt, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", progress=False, **kw).images


# ---- parity -------------------------------------------------------------------------------------------------------

def test_diffusers_folder_matches_ldm_text_to_image_pipeline(ldm):
    folder, pipe, guided, plain = ldm
    ours = Pipeline.from_pretrained(folder)
    assert ours.config.guidance_scale == 1.0 and ours.config.text_encoder.kind == "bert"
    assert np.abs(run(ours, guidance_scale=GUIDANCE, seed=0) - guided).max() <= PIXEL_TOL
    assert np.abs(run(ours, seed=1) - plain).max() <= PIXEL_TOL  # default guidance: 1.0, no CFG, as diffusers
    python_loop = Pipeline(ours.model, scheduler="python")  # the runs above took the native C++ loop
    assert np.abs(run(python_loop, guidance_scale=GUIDANCE, seed=0) - guided).max() <= PIXEL_TOL
    ids = bert_ids(pipe, [PROMPT, "", "Café! un-affable x y?"])
    with torch.no_grad():
        assert (ours.model.text_encoder(ids) - pipe.bert(ids)[0]).abs().max() <= TEXT_TOL
        context, uncond = ours.encode_prompt(PROMPT)  # CFG's empty prompt: [CLS] [SEP] [PAD]...
        assert (context - pipe.bert(ids[:1])[0]).abs().max() <= TEXT_TOL
        assert (uncond - pipe.bert(ids[1:2])[0]).abs().max() <= TEXT_TOL


def original_file(tmp_path, folder, pipe, suffix=".ckpt"):
    """The folder's weights in the original single-file layout, as a LatentDiffusion checkpoint holds them."""
    model = load_checkpoint(folder)
    orig = original_from_ldmbert(pipe.bert)
    sd = {"cond_stage_model.transformer." + k: v for k, v in orig.state_dict().items()}
    sd |= {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in model.vae.state_dict().items()}
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    path = tmp_path / f"txt2img{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, orig


def test_original_single_file_detected_from_keys(ldm, tmp_path):
    folder, pipe, guided, _ = ldm
    path, orig = original_file(tmp_path, folder, pipe)
    ids = bert_ids(pipe, [PROMPT, "a red circle"])
    with torch.no_grad():  # the re-stated original module is diffusers' LDMBert, weight for weight
        assert (orig(ids) - pipe.bert(ids)[0]).abs().max() <= 1e-5
    model = load_checkpoint(path, tokenizer=folder / "tokenizer")  # the checkpoint has no vocabulary
    cfg = model.config
    assert (cfg.conditioning, cfg.task, cfg.guidance_scale, cfg.scale_factor) == ("text", "txt2img", 1.0, 0.18215)
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (0.00085, 0.012)  # read off the betas buffer
    assert (cfg.text_encoder.heads, cfg.text_encoder.head_dim, cfg.text_encoder.layers) == (8, 64, 2)
    with torch.no_grad():
        assert (model.text_encoder(ids) - orig(ids)).abs().max() <= TEXT_TOL
    assert np.abs(run(Pipeline(model), guidance_scale=GUIDANCE, seed=0) - guided).max() <= PIXEL_TOL


TINY_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params: {linear_start: 0.00085, linear_end: 0.012, timesteps: 1000, first_stage_key: image, cond_stage_key: caption,
           image_size: 8, channels: 4, cond_stage_trainable: true, conditioning_key: crossattn, scale_factor: 0.18215,
    unet_config: {target: ldm.modules.diffusionmodules.openaimodel.UNetModel,
      params: {image_size: 8, in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1],
               num_res_blocks: 2, channel_mult: [1, 2], num_head_channels: 32, use_spatial_transformer: true,
               transformer_depth: 1, context_dim: 32, legacy: false}},
    first_stage_config: {target: ldm.models.autoencoder.AutoencoderKL,
      params: {embed_dim: 4, ddconfig: {double_z: true, z_channels: 4, resolution: 64, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 1, 1, 1], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}}},
    cond_stage_config: {target: ldm.modules.encoders.modules.BERTEmbedder,
      params: {n_embed: 32, n_layer: 2, vocab_size: VOCAB}}}
"""


def test_original_yaml_and_safetensors(ldm, tmp_path):
    folder, pipe, guided, _ = ldm
    path, _ = original_file(tmp_path, folder, pipe, ".safetensors")
    config = tmp_path / "txt2img-tiny.yaml"
    config.write_text(TINY_YAML.replace("VOCAB", str(len(WORDS))))
    ours = Pipeline.from_pretrained(path, config=str(config), tokenizer=folder / "tokenizer" / "tokenizer.json")
    assert ours.config.text_encoder.tokenizer and ours.config.guidance_scale == 1.0
    assert np.abs(run(ours, guidance_scale=GUIDANCE, seed=0) - guided).max() <= PIXEL_TOL


def _yaml(cond: dict, unet: dict, first_stage: dict, **params) -> dict:
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        **params, "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": first_stage, "cond_stage_config": cond}}}


KL_F8 = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}
VQ_F4 = {"target": "ldm.models.autoencoder.VQModelInterface", "params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": {
    "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}
# the released configs' numbers: configs/latent-diffusion/txt2img-1p4B-eval.yaml, models/ldm/text2img256/config.yaml
FULL_SIZE = {
    "ldm-txt2img-f8": _yaml(
        {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": 1280, "n_layer": 32}},
        {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
         "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True,
         "transformer_depth": 1, "context_dim": 1280, "use_checkpoint": True, "legacy": False},
        KL_F8, linear_start=0.00085, linear_end=0.012, timesteps=1000, cond_stage_key="caption", image_size=32,
        conditioning_key="crossattn", scale_factor=0.18215),
    "ldm-txt2img-f4-cc": _yaml(
        {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": 640, "n_layer": 32}},
        {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192, "attention_resolutions": [8, 4, 2],
         "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_head_channels": 32, "use_spatial_transformer": True,
         "transformer_depth": 1, "context_dim": 640},
        VQ_F4, linear_start=0.0015, linear_end=0.0195, timesteps=1000, cond_stage_key="caption", image_size=64,
        conditioning_key="crossattn"),
}
_FIELDS = ("unet", "vae", "text_encoder", "conditioning", "task", "scale_factor", "sample_size", "guidance_scale")


def _same_model(cfg, preset):
    for name in _FIELDS:
        assert getattr(cfg, name) == getattr(preset, name), name
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (preset.schedule.beta_start, preset.schedule.beta_end)


@pytest.mark.parametrize("name", ["ldm-txt2img-f8", "ldm-txt2img-f4-cc"])
def test_released_configs_and_keys_give_the_presets(name, tmp_path):
    """The released YAMLs read as the presets; full-size weights (shapes only, on the meta device) are detected as them."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(FULL_SIZE[name]))
    preset = get_preset(name)
    _same_model(config_from_yaml(path), preset)
    with torch.device("meta"):
        unet, vae, text = UNetModel(preset.unet), build_autoencoder(preset.vae), BERTEncoder(preset.text_encoder)
    _same_model(detect_config(unet.state_dict(), vae.state_dict(), text.state_dict(), False, {}, name), preset)


def test_configs_round_trip_and_travel_in_the_file(tmp_path):
    from ldm_engine.loading.export import save_single_file
    from ldm_engine.loading import random_model
    from ldm_engine.models.configs import from_dict, to_dict

    for name in ("ldm-txt2img-f8", "ldm-txt2img-f4-cc", "ldm-layout2img", "tiny-ldm-bert", "tiny-ldm-layout"):
        assert from_dict(json.loads(json.dumps(to_dict(get_preset(name))))) == get_preset(name)
    model = random_model("tiny-ldm-bert")
    save_single_file(tmp_path / "m.safetensors", model.config, model.unet, model.vae, model.text_encoder)
    again = load_checkpoint(tmp_path / "m.safetensors")  # original BERT keys; the config from the metadata
    assert again.config == model.config and isinstance(again.tokenizer, WordPieceTokenizer)
    ids = again.tokenizer([PROMPT])
    with torch.no_grad():
        assert torch.equal(again.text_encoder(ids), model.text_encoder(ids))


# ---- the tokenizer ------------------------------------------------------------------------------------------------

PROMPTS = [PROMPT, "A Painting of CATS, on the red circle!!!", "Café crème brûlée, naïve résumé ... zxqwv", "东京 🤖 ok?",
           "hello[MASK]world [CLS] x", "don't stop—believin' $100 & 50% #1 @home ^_^ `tick` ~tilde", "ÅNGSTRÖM İstanbul ß",
           "x" * 120 + " y", "tab\there\nnew\u200bline\u00a0nbsp\x00", "unaffable squirrels, " * 30, ""]


def test_wordpiece_matches_bert_tokenizer_on_a_tiny_vocabulary(ldm):
    folder, pipe, _, _ = ldm
    vocab_txt = folder.parent / "vocab" / "vocab.txt"
    for source in (vocab_txt, folder / "tokenizer", folder / "tokenizer" / "tokenizer.json"):
        ours = WordPieceTokenizer(source)
        assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (2, 3, 0)
        for p in PROMPTS:
            assert ours.encode(p) == bert_ids(pipe, [p])[0].tolist(), p
        assert ours.tokenize("eating") == [WORDS.index("eat"), WORDS.index("##ing")]


def test_embedded_vocabulary_is_bert_base_uncased(tmp_path):
    """blingfire's compiled bert-base-uncased, read back: BertTokenizer on it agrees with us, and so does
    blingfire's own tokenizer (independent code) wherever its documented edge cases do not arise."""
    import blingfire
    from transformers import BertTokenizer

    vocab = embedded_vocab()
    assert len(vocab) == 30522 and len(set(vocab.values())) == 30522
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "##s", "!")] == \
        [0, 100, 101, 102, 103, 1996, 2015, 999]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    hf, ours = BertTokenizer(str(path)), WordPieceTokenizer()
    for p in PROMPTS:
        assert ours.encode(p) == hf(p, padding="max_length", max_length=77, truncation=True).input_ids, p
    model = blingfire.load_model(str(__import__("pathlib").Path(blingfire.__file__).parent / "bert_base_tok.bin"))
    for p in PROMPTS[:4] + PROMPTS[5:7]:
        theirs = blingfire.text_to_ids(model, p, 200, 100, no_padding=True).tolist()
        assert ours.tokenize(p) == theirs, p
    blingfire.free_model(model)


def test_tokenizer_truncates_at_77_and_names_the_rest(caplog):
    tok = WordPieceTokenizer()
    ids = tok.encode("red " * 100)
    assert len(ids) == 77 and ids[0] == 101 and ids[-1] == 102 and ids.count(tok.tokenize("red")[0]) == 75
    assert "dropped" in caplog.text


def test_bad_vocabularies(tmp_path):
    (tmp_path / "v.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"not a BERT WordPiece vocabulary \(no \[CLS\], \[SEP\]"):
        WordPieceTokenizer(tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WordPieceTokenizer(tmp_path / "missing.txt")
    (tmp_path / "t.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a WordPiece tokenizer"):
        WordPieceTokenizer(tmp_path / "t.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither vocab.txt nor tokenizer.json"):
        WordPieceTokenizer(tmp_path / "empty")


# ---- prompts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["plain", "a1111"])
def test_long_prompts(ldm, syntax):
    """diffusers (and the original BERTTokenizer) truncate at 75 word pieces. Here a long prompt goes on in further
    77-token chunks, as for every text model: without a comma in its last 20 pieces the first chunk is exactly
    diffusers' embedding (with one, the chunk ends after that comma, as A1111 cuts). The tokenizer's own call
    truncates as diffusers does, for prompt_embeds= that match diffusers on any prompt."""
    folder, pipe, _, _ = ldm
    ours = Pipeline.from_pretrained(folder, prompt_syntax=syntax)
    long = "a photo of a red cat on the blue square " * 10  # 90 word pieces
    context, uncond = ours.encode_prompt(long)
    assert context.shape == uncond.shape == (1, 154, 32)
    with torch.no_grad():
        truncated = pipe.bert(bert_ids(pipe, [long]))[0]
        assert (context[:, :77] - truncated).abs().max() <= TEXT_TOL
        assert (uncond[:, 77:] - pipe.bert(bert_ids(pipe, [""]))[0]).abs().max() <= TEXT_TOL
        ids = ours.model.tokenizer([long])
        assert ids.tolist() == bert_ids(pipe, [long]).tolist()
        assert (ours.backend.encode_text(ids) - truncated).abs().max() <= TEXT_TOL
    with_commas = ours.prompts.chunks("a photo of a red cat, on the blue square, " * 8)
    assert len(with_commas) == 2 and with_commas[0].ids[with_commas[0].ids.index(3) - 1] == WORDS.index(",")


def test_clip_skip_and_textual_inversion_on_the_bert_transformer(ldm, tmp_path):
    folder, pipe, _, _ = ldm
    ours = Pipeline.from_pretrained(folder)
    enc = ours.model.text_encoder
    ids = bert_ids(pipe, [PROMPT])
    with torch.no_grad():  # clip skip 2: the first of two layers, then the final LayerNorm
        first = enc.attn_layers.layers[1](enc.attn_layers.layers[0](enc.token_emb(ids) + enc.pos_emb.emb.weight))
        assert (ours.encode_prompt(PROMPT, clip_skip=2)[0] - enc.norm(first)).abs().max() <= TEXT_TOL
    vectors = torch.randn(2, 32)  # an A1111-style embedding file, as the textual-inversion paper's LDM code saves
    torch.save({"string_to_param": {"*": vectors}, "name": "mystyle"}, tmp_path / "mystyle.pt")
    before = ours.encode_prompt("a cat in <mystyle>")[0]
    assert ours.load_textual_inversion(tmp_path / "mystyle.pt", token="<mystyle>") == "<mystyle>"
    after = ours.encode_prompt("a cat in <mystyle>")[0]
    assert not torch.allclose(before, after)
    ours.unload_textual_inversions()
    assert torch.equal(ours.encode_prompt("a cat in <mystyle>")[0], before)


# ---- backends and the command line ---------------------------------------------------------------------------------

def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_run_the_bert_text_encoder(ldm, backend):
    folder, pipe, _, _ = ldm
    torch_pipe = Pipeline.from_pretrained(folder)
    graph = Pipeline.from_pretrained(folder, backend=backend, dtype=torch.float32, progress=False)
    ids = bert_ids(pipe, [PROMPT, ""])
    with torch.no_grad():
        assert (graph.backend.encode_text(ids) - torch_pipe.model.text_encoder(ids)).abs().max() <= TEXT_TOL
    assert psnr(run(graph, guidance_scale=GUIDANCE, seed=3), run(torch_pipe, guidance_scale=GUIDANCE, seed=3)) >= 40


def test_cli_generates_with_the_models_default_guidance(ldm, tmp_path):
    from PIL import Image

    from ldm_engine.cli import main

    folder, pipe, _, _ = ldm
    out = tmp_path / "out.png"
    assert main([PROMPT, "--model", str(folder), "--steps", "2", "--seed", "1", "--size", "64x64", "-o", str(out)]) == 0
    text = Image.open(out).text["parameters"]
    assert text.startswith(PROMPT) and "CFG scale: 1," in text
    path, _ = original_file(tmp_path, folder, pipe)
    assert main([PROMPT, "--model", str(path), "--tokenizer", str(folder / "tokenizer"), "--guidance", "5",
                 "--steps", "2", "--size", "64x64", "-o", str(out)]) == 0
    assert "CFG scale: 5," in Image.open(out).text["parameters"]


def test_bad_checkpoints_are_refused(ldm, tmp_path):
    folder, pipe, _, _ = ldm
    path, _ = original_file(tmp_path, folder, pipe, ".safetensors")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    del sd["cond_stage_model.transformer.attn_layers.layers.3.1.net.2.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"BERT transformer weights do not fit.*missing keys: attn_layers\.layers\.3"):
        load_checkpoint(tmp_path / "broken.safetensors", tokenizer=folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(path, tokenizer=tmp_path / "no-vocab.txt")
    bad = tmp_path / "bad-folder"
    import shutil

    shutil.copytree(folder, bad)
    c = json.loads((bad / "bert" / "config.json").read_text())
    (bad / "bert" / "config.json").write_text(json.dumps({**c, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="LDMBert activation 'relu' is not supported"):
        load_checkpoint(bad)
