"""dtype="int8" on the OpenVINO backend (ldm_engine.optimize.int8): the quantized graphs, their quality
against the fp32 OpenVINO run, the cache, and bad input."""
import numpy as np
import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from ldm_engine import Pipeline  # noqa: E402
from ldm_engine.bench import psnr  # noqa: E402
from ldm_engine.optimize import int8  # noqa: E402

KW = dict(num_inference_steps=6, guidance_scale=6.0, height=16, width=24, output_type="np", progress=False, seed=3)
# measured 41.3 dB on the tiny random model (random weights exaggerate quantization error)
PSNR_FLOOR = 35.0


@pytest.fixture(scope="module")
def int8_pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, backend="openvino", dtype="int8")


def test_int8_image_stays_close_to_fp32(int8_pipe, sd1_folder):
    ref = Pipeline.from_pretrained(sd1_folder, backend="openvino", dtype=torch.float32)("a red circle", **KW).images
    got = int8_pipe("a red circle", **KW).images
    assert np.isfinite(got).all()
    assert psnr(got, ref) >= PSNR_FLOOR


def test_unet_layers_are_int8_except_the_kept_ones(int8_pipe):
    int8_pipe("a red circle", **KW)
    unet = int8_pipe.backend._models["unet"]
    counts = int8.int8_ops(unet)
    assert counts["FakeQuantize"] > 0 and counts["int8_constants"] > 0
    quantized = int8.quantized_layers(unet)
    convs_and_linears = {op.get_friendly_name() for op in unet.get_ops()
                         if op.get_type_name() in ("Convolution", "MatMul")}
    kept = {n for n in convs_and_linears if int8.name_matches(n)} | set(int8.activation_matmuls(unet))
    assert kept and not (kept & quantized)  # time embedding, first/last conv, attention products stay float
    assert any("input_blocks.0" in n for n in kept) and any("/out/out.2/" in n for n in kept)
    assert any("attn1/MatMul" in n for n in kept)
    rest = convs_and_linears - kept
    assert len(quantized) >= 0.9 * len(rest)  # the other convolutions and linear layers run in int8
    text = int8_pipe.backend._models["text_encoder"]
    assert int8.int8_ops(text)["int8_constants"] > 0 and int8.int8_ops(text)["FakeQuantize"] == 0  # weights only


def test_second_load_finds_the_quantized_models(int8_pipe, sd1_folder, monkeypatch):
    first = int8_pipe("a red circle", **KW).images

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(int8, "calibration_feeds", no_calibration)
    monkeypatch.setattr(int8, "quantize_unet", no_calibration)
    again = Pipeline.from_pretrained(sd1_folder, backend="openvino", dtype="int8")("a red circle", **KW).images
    assert np.array_equal(first, again)


def test_calibration_settings_enter_the_key():
    base = int8.int8_key("unet-abc", "unet", int8.Calibration())
    assert base != int8.int8_key("unet-abc", "unet", int8.Calibration(steps=5))
    assert base != int8.int8_key("unet-abc", "unet", int8.Calibration(prompts=("x",)))
    assert base != int8.int8_key("unet-abd", "unet", int8.Calibration())
    assert base == int8.int8_key("unet-abc", "unet", int8.Calibration())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_int8_elsewhere_is_refused(sd1_folder, backend):
    with pytest.raises(ValueError, match="dtype='int8' runs on backend='openvino'"):
        Pipeline.from_pretrained(sd1_folder, backend=backend, dtype="int8")


def test_int8_without_nncf_says_how_to_install(sd1_folder, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_nncf(name, *a, **k):
        if name == "nncf":
            raise ImportError("no nncf")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    with pytest.raises(RuntimeError, match=r"pip install 'ldm_engine\[int8\]'"):
        Pipeline.from_pretrained(sd1_folder, backend="openvino", dtype="int8")


def test_lora_on_int8_is_refused_and_leaves_the_weights(tmp_path):
    from test_lora_backends import lora_file

    from ldm_engine.loading import random_model

    pipe = Pipeline(random_model("tiny-sd1", seed=11), "openvino", dtype="int8", progress=False,
                    cache_dir=tmp_path / "cache")
    before = {k: v.clone() for k, v in pipe.model.unet.state_dict().items()}
    with pytest.raises(ValueError, match="dtype='int8' graphs are quantized for the weights they were made from"):
        pipe.load_lora(lora_file(tmp_path / "style.safetensors"), 0.9)
    assert all(torch.equal(before[k], v) for k, v in pipe.model.unet.state_dict().items())
    assert pipe.loras == []


def test_cli_generates_with_int8(int8_pipe, sd1_folder, tmp_path, capsys):
    from ldm_engine.cli import main

    args = ["a red circle", "--model", str(sd1_folder), "--steps", "3", "--size", "24x16", "--seed", "1"]
    assert main([*args, "--backend", "openvino", "--dtype", "int8", "-o", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main([*args, "--backend", "torch", "--dtype", "int8", "-o", str(tmp_path / "b.png")]) == 2
    assert "dtype='int8' runs on backend='openvino'" in capsys.readouterr().err


def test_quantizing_keeps_stdout_clean(sd1_folder, tmp_path, capfd):
    """NNCF's progress goes to stderr: stdout carries a command's own output (JSON rows) only."""
    import openvino as ov

    from ldm_engine.export.artifacts import onnx_artifact
    from ldm_engine.export.cache import ArtifactCache
    from ldm_engine.loading import load_checkpoint

    model = load_checkpoint(sd1_folder)
    cache = ArtifactCache(tmp_path / "cache")
    path = onnx_artifact(model, "text_encoder", cache=cache, progress=False)
    capfd.readouterr()
    compressed = int8.int8_model(ov.Core(), path, "text_encoder", path.parent.name, model, cache, progress=False)
    assert int8.int8_ops(compressed)["int8_constants"] > 0
    assert capfd.readouterr().out == ""
