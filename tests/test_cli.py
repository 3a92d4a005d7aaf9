"""`ldm-generate` writes PNGs carrying their generation parameters, and fails with one clear line."""
from PIL import Image

from ldm_engine.cli import main


def test_generate_writes_png_with_parameters(sd1_folder, tmp_path, capsys):
    out = tmp_path / "cat.png"
    rc = main(["a photo of a cat", "--model", str(sd1_folder), "--steps", "2", "--seed", "7", "--size", "16x24",
               "--sampler", "euler", "--guidance", "5", "--negative", "blurry", "-o", str(out)])
    assert rc == 0 and out.is_file()
    image = Image.open(out)
    assert image.size == (16, 24)
    assert image.text["prompt"] == "a photo of a cat" and image.text["seed"] == "7"
    assert image.text["sampler"] == "euler" and image.text["negative"] == "blurry"
    assert len(image.text["model_hash"]) == 10 and "Steps: 2, Sampler: Euler" in image.text["parameters"]
    assert "seed 7" in capsys.readouterr().out


def test_num_writes_numbered_files(sd1_folder, tmp_path):
    assert main(["x", "--model", str(sd1_folder), "--steps", "1", "--num", "2", "--size", "16x16",
                 "-o", str(tmp_path / "im.png")]) == 0
    assert (tmp_path / "im-0.png").is_file() and (tmp_path / "im-1.png").is_file()


def test_bad_input_is_one_line_and_exit_2(sd1_folder, tmp_path, capsys):
    assert main(["x", "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["x", "--model", str(sd1_folder), "--size", "10x16", "--steps", "1"]) == 2
    assert "multiple of 4" in capsys.readouterr().err


def test_graph_backends_generate_the_same_picture(sd1_folder, tmp_path, capsys):
    import numpy as np
    import pytest

    pytest.importorskip("onnxruntime")
    common = ["a photo of a cat", "--model", str(sd1_folder), "--steps", "2", "--seed", "5", "--size", "16x16"]
    assert main(common + ["-o", str(tmp_path / "torch.png")]) == 0
    assert main(common + ["--backend", "onnxruntime", "-o", str(tmp_path / "ort.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in ("torch", "ort"))
    assert np.abs(a - b).max() <= 2  # 8-bit pixels: at most a rounding step apart
    capsys.readouterr()
    assert main(common + ["--backend", "tensorrt", "--device", "cuda", "-o", str(tmp_path / "t.png")]) == 2
    assert "TensorRT" in capsys.readouterr().err
