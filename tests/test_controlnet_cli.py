"""Canny preprocessor, `ldm-generate --controlnet`, and the A1111-style ControlNet entry of the PNG."""
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_engine import Pipeline
from ldm_engine.cli import main
from ldm_engine.control.preprocess import canny, preprocess

from test_controlnet import make_controlnet


def _photo(w=16, h=16):
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[4:12, 5:11] = (250, 40, 30)  # a red box: its border is the only edge
    return Image.fromarray(a)


def test_canny_matches_opencv_and_checks_thresholds():
    import cv2

    edges = np.asarray(canny(_photo(), 50, 150))
    expected = cv2.Canny(np.asarray(_photo()), 50, 150)
    assert edges.shape == (16, 16, 3) and (edges == expected[:, :, None]).all()
    assert edges.max() == 255 and edges[0, 0, 0] == 0
    with pytest.raises(ValueError, match="low=200, high=100"):
        canny(_photo(), 200, 100)
    with pytest.raises(ValueError, match="unknown preprocessor 'depth'"):
        preprocess(_photo(), "depth")
    assert np.array_equal(np.asarray(preprocess(_photo())), np.asarray(_photo()))


def test_canny_without_opencv_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="opencv-python-headless"):
        canny(_photo())


def test_cli_controlnet_image_and_parameters(sd1_folder, tmp_path):
    make_controlnet(sd1_folder, tmp_path / "edges", seed=3)
    _photo().save(tmp_path / "photo.png")
    out = tmp_path / "out.png"
    rc = main(["a red circle", "--model", str(sd1_folder), "--controlnet", str(tmp_path / "edges"), "--control-image",
               str(tmp_path / "photo.png"), "--control-scale", "0.8", "--canny", "50,150", "--steps", "3",
               "--seed", "2", "--size", "16x16", "-o", str(out)])
    assert rc == 0
    text = Image.open(out).text["parameters"]
    pipe = Pipeline.from_pretrained(sd1_folder)
    pipe.load_controlnet(tmp_path / "edges")
    h = pipe.control.loaded[0].hash
    assert len(h) == 8
    assert (f'ControlNet 0: "Module: canny, Model: edges [{h}], Weight: 0.8, Threshold A: 50, Threshold B: 150, '
            'Guidance Start: 0, Guidance End: 1"') in text
    expected = pipe("a red circle", control_image=canny(_photo(), 50, 150), controlnet_conditioning_scale=0.8,
                    num_inference_steps=3, seed=2, height=16, width=16, guidance_scale=7.5, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_cli_control_errors(sd1_folder, tmp_path, capsys):
    rc = main(["x", "--model", str(sd1_folder), "--controlnet", str(tmp_path / "a"), "--steps", "1"])
    assert rc == 2 and "1 --controlnet but 0 --control-image" in capsys.readouterr().err
    rc = main(["x", "--model", str(sd1_folder), "--canny", "100,200", "--steps", "1"])
    assert rc == 2 and "need --controlnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["x", "--canny", "100"])
