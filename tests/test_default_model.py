"""The embedded default model: shipped weights load through the ordinary loader and draw what they
are asked to draw (checked by the deterministic shapes checker)."""
import pytest
from PIL import Image

from ldm_engine import Pipeline, load_checkpoint
from ldm_engine.cli import main
from ldm_engine.defaults import DEFAULT_MODEL
from ldm_engine.training.checker import classify
from ldm_engine.training.data import caption


def test_shipped_weights_load_through_the_normal_loader():
    assert DEFAULT_MODEL.stat().st_size <= 20 * 2 ** 20
    model = load_checkpoint(DEFAULT_MODEL)  # the config travels inside the file
    assert model.config.name == "shapes-ldm" and model.config.image_size == 64
    assert model.tokenizer is not None and model.text_encoder.config.width == 64


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()  # no path: the embedded model


def test_generations_pass_the_checker(pipe):
    triples = [("red", "circle", "blue"), ("yellow", "square", "black"), ("green", "triangle", "white"),
               ("blue", "circle", "orange"), ("white", "square", "purple"), ("black", "triangle", "yellow")] * 2
    out = pipe([caption(*t) for t in triples], num_inference_steps=20, guidance_scale=4.0, seed=0, output_type="np",
               progress=False)
    verdicts = [classify((img * 255).round().astype("uint8")) for img in out.images]
    colour = sum(v["colour"] == t[0] for v, t in zip(verdicts, triples))
    shape = sum(v["shape"] == t[1] for v, t in zip(verdicts, triples))
    background = sum(v["background"] == t[2] for v, t in zip(verdicts, triples))
    assert colour >= 9 and background >= 10 and shape >= 8, verdicts  # most of the 12


def test_cli_uses_the_embedded_model(tmp_path):
    out = tmp_path / "circle.png"
    assert main(["a red circle on a blue background", "--seed", "1", "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and image.text["steps"] == "20" and image.text["model"] == DEFAULT_MODEL.name
