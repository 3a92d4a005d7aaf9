"""Layout-to-image (OpenImages layout2img): the bounding-box tokens against hand-written ones and a faithful
re-statement of taming-transformers' ObjectsBoundingBoxConditionalBuilder, the model from the original
single-file layout (its transformer against the re-stated original module) and YAML, generation on torch,
ONNX Runtime and OpenVINO, ldm-generate --layout, and bad layouts."""
import math
import random

import numpy as np
import pytest
import torch
import yaml

from test_ldm_txt2img import OriginalTransformer, _same_model, _yaml, VQ_F4, psnr
from ldm_engine import Pipeline, load_checkpoint
from ldm_engine.conditioning.layout import LayoutScheme, layout_ids
from ldm_engine.loading import random_model
from ldm_engine.loading.detect import detect_config
from ldm_engine.loading.yaml_config import config_from_yaml
from ldm_engine.models import BERTEncoder, UNetModel, build_autoencoder, get_preset
from ldm_engine.models.configs import AutoencoderConfig, BERTConfig, LDMConfig, ScheduleConfig, UNetConfig

TEXT_TOL = 1e-4
LAYOUT = [(3, (0.1, 0.2, 0.5, 0.9)), (7, (0.5, 0.05, 0.95, 0.6))]


# ---- the tokens ---------------------------------------------------------------------------------------------------

def test_tokens_written_out_by_hand():
    """V = 8192: a 90 x 90 grid (token = row * 90 + column, rows and columns round(coordinate * 89)), 30 objects
    of (class, top-left, bottom-right), padding 8191, then the full-image crop (0, 8099)."""
    objects = [(5, (0.1, 0.2, 0.5, 0.9)), (17, (0.0, 0.0, 1.0, 1.0)), (8190, (0.25, 0.75, 0.3, 1.0))]
    expected = [5, 18 * 90 + 9, 80 * 90 + 44,  # 0.5 * 89 = 44.5 rounds to the even 44
                17, 0, 89 * 90 + 89,
                8190, 67 * 90 + 22, 89 * 90 + 27]
    expected += [8191] * 3 * 27 + [0, 8099]
    ids = layout_ids(objects, get_preset("ldm-layout2img").text_encoder)
    assert ids.shape == (1, 92) and ids[0].tolist() == expected
    empty = layout_ids([], get_preset("ldm-layout2img").text_encoder)[0].tolist()
    assert empty == [8191] * 90 + [0, 8099]


class OriginalBoxBuilder:
    """taming-transformers' ObjectsBoundingBoxConditionalBuilder.build for annotations (category, (x, y, w, h)),
    re-stated: no shuffle, no flip, the full-image crop, encode_crop on."""

    full_crop = (0.0, 0.0, 1.0, 1.0)

    def __init__(self, no_max_objects, no_tokens):
        self.no_max_objects, self.no_tokens = no_max_objects, no_tokens
        self.no_sections = int(math.sqrt(no_tokens))
        self.none = no_tokens - 1

    def tokenize_coordinates(self, x, y):
        return int(round(y * (self.no_sections - 1))) * self.no_sections + int(round(x * (self.no_sections - 1)))

    def token_pair_from_bbox(self, b):
        return self.tokenize_coordinates(b[0], b[1]), self.tokenize_coordinates(b[0] + b[2], b[1] + b[3])

    def build(self, annotations):
        def overlap(r1, r2):
            x = max(0.0, min(r1[0] + r1[2], r2[0] + r2[2]) - max(r1[0], r2[0]))
            y = max(0.0, min(r1[1] + r1[3], r2[1] + r2[3]) - max(r1[1], r2[1]))
            return x * y

        def rescale(b, c):
            clamp = lambda v: max(min(v, 1.0), 0.0)  # noqa: E731
            x0, y0 = clamp((b[0] - c[0]) / c[2]), clamp((b[1] - c[1]) / c[3])
            return x0, y0, min(b[2] / c[2], 1 - x0), min(b[3] / c[3], 1 - y0)

        kept = [(cat, rescale(b, self.full_crop)) for cat, b in annotations if overlap(b, self.full_crop) > 0.0]
        triples = [(cat, *self.token_pair_from_bbox(b)) for cat, b in kept]
        triples += [(self.none,) * 3] * (self.no_max_objects - len(triples))
        return [t for triple in triples for t in triple] + list(self.token_pair_from_bbox(self.full_crop))


@pytest.mark.parametrize("vocab, objects", [(8192, 30), (128, 4)])
def test_tokens_match_the_original_builder(vocab, objects):
    rng = random.Random(vocab)
    builder = OriginalBoxBuilder(objects, vocab)
    config = BERTConfig(vocab_size=vocab, max_length=3 * objects + 2, width=8, layers=1, tokenizer=False)
    for _ in range(50):
        layout = []
        for _ in range(rng.randint(0, objects)):
            x0, x1 = sorted(rng.sample(range(101), 2))
            y0, y1 = sorted(rng.sample(range(101), 2))
            layout.append((rng.randrange(vocab - 1), (x0 / 100, y0 / 100, x1 / 100, y1 / 100)))
        theirs = builder.build([(c, (b[0], b[1], b[2] - b[0], b[3] - b[1])) for c, b in layout])
        assert layout_ids(layout, config)[0].tolist() == theirs


def test_class_names_and_batches(tmp_path):
    config = get_preset("tiny-ldm-layout").text_encoder
    names = tmp_path / "names.txt"
    names.write_text("Person\nTree\nCar\n")
    by_name = layout_ids([("person", (0.1, 0.1, 0.5, 0.5)), ("Car", (0.2, 0.2, 0.9, 0.9))], config, names)
    by_number = layout_ids([(0, (0.1, 0.1, 0.5, 0.5)), (2, (0.2, 0.2, 0.9, 0.9))], config)
    assert torch.equal(by_name, by_number)
    batch = layout_ids([[(0, (0.1, 0.1, 0.5, 0.5))], [], LAYOUT], config)  # a list of layouts: one row each
    assert batch.shape == (3, 14) and batch[1].tolist() == [127] * 12 + [0, 120]  # 11 x 11 grid, padding 127
    assert LayoutScheme.of(config).point(1.0, 1.0) == 120


# ---- the model ----------------------------------------------------------------------------------------------------

def tiny_config() -> LDMConfig:
    """32 norm groups and 8 heads x 64 in the transformer, as the original modules have: detectable from keys."""
    return LDMConfig(
        "tiny-layout-32",
        UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2),
                   num_head_channels=32, transformer_depth=1, context_dim=32),
        AutoencoderConfig(kind="vq", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, embed_dim=3, n_embed=64),
        BERTConfig(vocab_size=128, max_length=14, width=32, layers=2, tokenizer=False),
        conditioning="layout", task="layout", scale_factor=1.0, sample_size=8, guidance_scale=1.0,
        schedule=ScheduleConfig(beta_start=0.0015, beta_end=0.0205))


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    """An original-layout checkpoint: UNet, VQ-f4, the re-stated original transformer, the DDPM betas."""
    cfg = tiny_config()
    model = random_model(cfg, seed=3)
    torch.manual_seed(4)
    orig = OriginalTransformer(128, 14, 32, 2).eval()
    sd = {"cond_stage_model.transformer." + k: v for k, v in orig.state_dict().items()}
    sd |= {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    sd |= {"first_stage_model." + k: v for k, v in model.vae.state_dict().items()}
    sd["betas"] = torch.linspace(0.0015 ** 0.5, 0.0205 ** 0.5, 1000, dtype=torch.float64) ** 2
    path = tmp_path_factory.mktemp("layout") / "layout2img.ckpt"
    torch.save({"state_dict": sd}, path)
    return path, orig


def run(pipe, layout=LAYOUT, **kw):
    return pipe(layout=layout, height=16, width=16, num_inference_steps=2, seed=0, output_type="np", progress=False,
                **kw).images


def test_original_file_detected_and_its_transformer_matches(layout_file):
    path, orig = layout_file
    model = load_checkpoint(path)
    cfg = model.config
    assert (cfg.conditioning, cfg.task, cfg.scale_factor, cfg.guidance_scale) == ("layout", "layout", 1.0, 1.0)
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (0.0015, 0.0205)
    assert cfg.text_encoder == tiny_config().text_encoder and model.tokenizer is None
    ids = layout_ids([LAYOUT, []], cfg.text_encoder)
    with torch.no_grad():
        assert (model.text_encoder(ids) - orig(ids)).abs().max() <= TEXT_TOL
    pipe = Pipeline(model)
    assert pipe.prompts is None
    a, b = run(pipe), run(pipe, layout=[(3, (0.6, 0.6, 0.9, 0.9))])
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all() and not np.allclose(a, b)  # the layout matters
    assert np.abs(run(Pipeline(model, scheduler="python")) - a).max() <= 1e-6  # the C++ loop = the Python one
    two = pipe(layout=[LAYOUT, []], num_images_per_prompt=2, height=16, width=16, num_inference_steps=1, seed=[1, 2, 3, 4],
               output_type="np", progress=False).images
    assert two.shape == (4, 16, 16, 3)


TINY_LAYOUT_YAML = _yaml(
    {"target": "ldm.modules.encoders.modules.BERTEmbedder",
     "params": {"n_embed": 32, "n_layer": 2, "vocab_size": 128, "max_seq_len": 14, "use_tokenizer": False}},
    {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [1, 2],
     "num_res_blocks": 2, "channel_mult": [1, 2], "num_head_channels": 32, "use_spatial_transformer": True,
     "transformer_depth": 1, "context_dim": 32},
    {"target": "ldm.models.autoencoder.VQModelInterface", "params": {"embed_dim": 3, "n_embed": 64, "ddconfig": {
        "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
    linear_start=0.0015, linear_end=0.0205, timesteps=1000, loss_type="l1", cond_stage_key="coordinates_bbox",
    image_size=8, channels=3, conditioning_key="crossattn")
# models/ldm/layout2img-openimages256/config.yaml's numbers
FULL_LAYOUT_YAML = _yaml(
    {"target": "ldm.modules.encoders.modules.BERTEmbedder",
     "params": {"n_embed": 512, "n_layer": 16, "vocab_size": 8192, "max_seq_len": 92, "use_tokenizer": False}},
    {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 128, "attention_resolutions": [8, 4, 2],
     "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4], "num_head_channels": 32, "use_spatial_transformer": True,
     "transformer_depth": 3, "context_dim": 512},
    VQ_F4, linear_start=0.0015, linear_end=0.0205, timesteps=1000, loss_type="l1", cond_stage_key="coordinates_bbox",
    image_size=64, channels=3, conditioning_key="crossattn")


def test_original_yaml(layout_file, tmp_path):
    path, _ = layout_file
    config = tmp_path / "layout-tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_LAYOUT_YAML))
    by_yaml, detected = load_checkpoint(path, config=str(config)), load_checkpoint(path)
    _same_model(by_yaml.config.replace(name="x", sample_size=64), detected.config.replace(name="x"))
    assert np.array_equal(run(Pipeline(by_yaml)), run(Pipeline(detected)))
    full = tmp_path / "layout2img.yaml"
    full.write_text(yaml.safe_dump(FULL_LAYOUT_YAML))
    preset = get_preset("ldm-layout2img")
    _same_model(config_from_yaml(full), preset)
    with torch.device("meta"):
        unet, vae, text = UNetModel(preset.unet), build_autoencoder(preset.vae), BERTEncoder(preset.text_encoder)
    _same_model(detect_config(unet.state_dict(), vae.state_dict(), text.state_dict(), False, {}, "x"), preset)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends(layout_file, backend):
    path, _ = layout_file
    ref = run(Pipeline.from_pretrained(path))
    out = run(Pipeline.from_pretrained(path, backend=backend, dtype=torch.float32, progress=False))
    assert psnr(out, ref) >= 40


def test_cli_layout(layout_file, tmp_path):
    from PIL import Image

    from ldm_engine.cli import main

    path, _ = layout_file
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(90)) + "\n")
    out = tmp_path / "out.png"
    layout = '[["class 3", [0.1, 0.2, 0.5, 0.9]], [7, [0.5, 0.05, 0.95, 0.6]]]'
    assert main(["--model", str(path), "--layout", layout, "--class-names", str(names), "--steps", "2", "--seed", "0",
                 "--size", "16x16", "-o", str(out)]) == 0
    image = Image.open(out)
    assert np.abs(np.asarray(image, np.float32) / 255 - run(Pipeline.from_pretrained(path))[0]).max() <= 1 / 255 + 1e-6
    text = image.text["parameters"]
    assert 'Layout: "[[\\"class 3\\", [0.1, 0.2, 0.5, 0.9]], [7, [0.5, 0.05, 0.95, 0.6]]]"' in text
    assert "Class names: names.txt [" in text and "CFG scale: 1," in text
    file = tmp_path / "layout.json"
    file.write_text('[[3, [0.1, 0.2, 0.5, 0.9]]]')
    assert main(["--model", str(path), "--layout", str(file), "--steps", "1", "--size", "16x16", "-o", str(out)]) == 0
    assert main(["--model", str(path), "--layout", '[["class 3", [0.1, 0.2, 1.5, 0.9]]]', "--class-names", str(names),
                 "--steps", "1", "-o", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--layout", "[[3, [0.1,", "-o", str(out)])


@pytest.mark.parametrize("layout, names, message", [
    ([("Persn", (0.1, 0.1, 0.5, 0.5))], ["Person", "Tree"], r"object 0: unknown class 'Persn'.*did you mean 'Person'"),
    ([("Person", (0.1, 0.1, 0.5, 0.5))], None, r"class 'Person' is a name, but the checkpoint stores no class names"),
    ([(2, (0.1, 0.1, 0.5, 0.5))], ["Person", "Tree"], r"class number 2 is out of range; this model takes 0\.\.1"),
    ([(127, (0.1, 0.1, 0.5, 0.5))], None, r"class number 127 is out of range; this model takes 0\.\.126"),
    ([(True, (0.1, 0.1, 0.5, 0.5))], None, r"class must be a class number or name, got True"),
    ([(1, (0.1, 0.1, 0.5, 0.5))] * 5, None, r"layout has 5 objects; this model takes at most 4"),
    ([(1, (0.1, 0.1, 1.5, 0.5))], None, r"object 0: box .* reaches outside the image"),
    ([(1, (-0.1, 0.1, 0.5, 0.5))], None, r"reaches outside the image"),
    ([(1, (0.5, 0.1, 0.5, 0.6))], None, r"box .* is empty; it needs x1 > x0 and y1 > y0"),
    ([(1, (0.1, 0.7, 0.5, 0.6))], None, r"is empty"),
    ([(1, (0.1, float("nan"), 0.5, 0.6))], None, r"holds NaN or inf"),
    ([(1, (0.1, 0.2, 0.5))], None, r"a box is four numbers"),
    ([(1, (0.1, "a", 0.5, 0.6))], None, r"a box is four numbers"),
    ([(1, 0.5)], None, r"object 0: expected \(class, \(x0, y0, x1, y1\)\)"),
    ("Person at the top", None, r"layout must be a list of \(class, \(x0, y0, x1, y1\)\) objects"),
    ([(1, (0.1, 0.1, 0.5, 0.5))], [""], r"class_names must be a list of non-empty strings"),
])
def test_bad_layouts(layout, names, message):
    with pytest.raises(ValueError, match=message):
        layout_ids(layout, get_preset("tiny-ldm-layout").text_encoder, names)


def test_layout_arguments_are_checked(tiny_sd1):
    pipe = Pipeline(random_model("tiny-ldm-layout"))
    with pytest.raises(ValueError, match="is a layout-to-image model: pass layout="):
        pipe(height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="takes layout=, not a prompt"):
        pipe("a cat", layout=LAYOUT, height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="not text-conditioned"):
        pipe(layout=LAYOUT, clip_skip=2, height=16, width=16, progress=False)
    with pytest.raises(FileNotFoundError, match="class names file"):
        pipe(layout=LAYOUT, class_names="missing.txt", height=16, width=16, progress=False)
    with pytest.raises(ValueError, match="is not a layout-to-image model"):
        Pipeline(tiny_sd1)("a cat", layout=LAYOUT, height=16, width=16, progress=False)
