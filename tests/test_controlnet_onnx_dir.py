"""ControlNets from a graph folder: `export_onnx.py --controlnet FILE ...` writes unet_control.onnx, one
controlnet_<name>.onnx per ControlNet (named as Pipeline.load_controlnet names the file) and controlnets.json;
a pipeline with onnx_dir runs them (image PSNR >= 40 dB against torch) and refuses a missing graph or
another ControlNet under an exported name, with the fix in the message."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_controlnet import _hint, make_controlnet  # noqa: E402

from ldm_engine.bench import psnr  # noqa: E402
from ldm_engine.loading import load_checkpoint  # noqa: E402
from ldm_engine.pipeline import Pipeline  # noqa: E402

KW = dict(num_inference_steps=3, guidance_scale=5.0, height=16, width=24, seed=3, output_type="np", progress=False,
          controlnet_conditioning_scale=0.8)


@pytest.fixture(scope="module")
def folder(sd1_folder, tmp_path_factory):
    """Two ControlNets with the same stem (so named cn and cn_2) exported with the model's graphs."""
    from ldm_engine.export.export_onnx import main

    root = tmp_path_factory.mktemp("cn_onnx_dir")
    make_controlnet(sd1_folder, root / "a" / "cn", seed=7)
    make_controlnet(sd1_folder, root / "b" / "cn", seed=8)
    out = root / "graphs"
    rc = main(["--model", str(sd1_folder), "--out", str(out), "--components", "text_encoder", "unet", "vae_decoder",
               "--controlnet", str(root / "a" / "cn"), "--controlnet", str(root / "b" / "cn")])
    assert rc == 0
    return out, root / "a" / "cn", root / "b" / "cn"


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return load_checkpoint(sd1_folder)


def test_export_writes_the_graphs_and_their_index(folder, sd1):
    from ldm_engine.control import read_controlnet
    from ldm_engine.export.control_graphs import controlnet_weights_hash

    out, a, b = folder
    assert {p.name for p in out.glob("*.onnx")} == {"text_encoder.onnx", "unet.onnx", "vae_decoder.onnx",
                                                    "unet_control.onnx", "controlnet_cn.onnx", "controlnet_cn_2.onnx"}
    index = json.loads((out / "controlnets.json").read_text())["controlnets"]
    assert sorted(index) == ["cn", "cn_2"]
    assert index["cn"]["graph"] == "controlnet_cn.onnx" and index["cn"]["source"] == str(a)
    assert index["cn_2"]["weights_hash"] == controlnet_weights_hash(read_controlnet(b, sd1.config.unet))
    assert index["cn"]["weights_hash"] != index["cn_2"]["weights_hash"]


def test_pipeline_runs_controlnets_from_onnx_dir(folder, sd1, monkeypatch):
    from ldm_engine.export import artifacts

    out, a, b = folder
    exported = []
    monkeypatch.setattr(artifacts, "export_component", lambda *x, **k: exported.append(x[1]))
    ref = Pipeline(sd1, "torch")
    pipe = Pipeline(sd1, "onnxruntime", progress=False, onnx_dir=out)
    for p in (ref, pipe):
        assert [p.load_controlnet(a), p.load_controlnet(b)] == ["cn", "cn_2"]  # the exported names
    kw = dict(KW, control_image=[_hint(1), _hint(2)], controlnet_conditioning_scale=[0.8, 0.5])
    expected, got = ref("a red circle", **kw).images, pipe("a red circle", **kw).images
    ref.unload_controlnets()
    without = ref("a red circle", **KW).images
    db = psnr(expected, got)
    print(f"onnx_dir, two ControlNets: {db:.1f} dB against torch (without control {psnr(expected, without):.1f} dB)")
    assert np.isfinite(got).all() and db >= 40 and np.abs(expected - without).max() > 4 / 255
    assert exported == []  # every graph came from the folder
    assert "unet_control" in pipe.backend._loaded_keys()


def test_guess_mode_from_onnx_dir(folder, sd1):
    out, a, _ = folder
    kw = dict(KW, control_image=_hint(3), guess_mode=True)
    ref, pipe = Pipeline(sd1, "torch"), Pipeline(sd1, "onnxruntime", progress=False, onnx_dir=out)
    for p in (ref, pipe):
        p.load_controlnet(a)
    db = psnr(ref("a red circle", **kw).images, pipe("a red circle", **kw).images)
    print(f"onnx_dir, guess mode: {db:.1f} dB against torch")
    assert db >= 40


def test_another_controlnet_under_an_exported_name_is_refused(folder, sd1):
    out, a, b = folder
    pipe = Pipeline(sd1, "onnxruntime", progress=False, onnx_dir=out)
    with pytest.raises(ValueError, match=r"ControlNet 'cn' has other weights .* its graph is there as 'cn_2': load "
                                         r"the ControlNets in the order they were exported"):
        pipe.load_controlnet(b)  # named cn: it is loaded first
    assert pipe.controlnets == []


def test_a_controlnet_the_folder_lacks_is_refused(folder, sd1, sd1_folder, tmp_path):
    out, a, _ = folder
    make_controlnet(sd1_folder, tmp_path / "other", seed=9)
    pipe = Pipeline(sd1, "onnxruntime", progress=False, onnx_dir=out)
    with pytest.raises(FileNotFoundError, match=r"no graph for ControlNet 'other' \(it has: cn, cn_2\); export it "
                                                r"with python export/export_onnx.py .*--controlnet FILE"):
        pipe.load_controlnet(tmp_path / "other")
    renamed = tmp_path / "cn"  # the same weights as cn_2 under a name the folder maps to other weights
    make_controlnet(sd1_folder, renamed, seed=9)
    with pytest.raises(ValueError, match=r"other weights .*export this one with python export/export_onnx.py"):
        pipe.load_controlnet(renamed)
    assert pipe.controlnets == []


def test_a_folder_without_control_graphs_is_refused(sd1, folder, tmp_path):
    out, a, _ = folder
    for name in ("text_encoder.onnx", "unet.onnx", "vae_decoder.onnx"):
        (tmp_path / name).symlink_to(out / name)
    pipe = Pipeline(sd1, "onnxruntime", progress=False, onnx_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no unet_control.onnx .*--controlnet FILE"):
        pipe.load_controlnet(a)
    assert pipe.controlnets == []
    img = pipe("a red circle", **{k: v for k, v in KW.items() if k != "controlnet_conditioning_scale"}).images
    assert np.isfinite(img).all()  # the model's own graphs still run


def test_export_refuses_a_bad_controlnet_before_writing(sd1_folder, tmp_path, capsys):
    from test_lora_backends import lora_file

    from ldm_engine.export.export_onnx import main

    lora = lora_file(tmp_path / "style.safetensors")
    rc = main(["--model", str(sd1_folder), "--out", str(tmp_path / "out"), "--controlnet", str(lora)])
    assert rc == 2 and "LoRA" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    rc = main(["--model", str(sd1_folder), "--out", str(tmp_path / "out"), "--controlnet", str(tmp_path / "none")])
    assert rc == 2 and "no such ControlNet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verify_covers_the_control_graphs(sd1_folder, tmp_path, capsys):
    from ldm_engine.export.export_onnx import main

    make_controlnet(sd1_folder, tmp_path / "cn", seed=7)
    rc = main(["--model", str(sd1_folder), "--out", str(tmp_path / "out"), "--components", "vae_decoder",
               "--controlnet", str(tmp_path / "cn"), "--verify"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "max abs vs torch" in line]
    assert rc == 0 and [line.split()[0] for line in lines] == ["vae_decoder", "unet_control", "controlnet_cn"]
    assert all(float(line.rsplit(" ", 1)[1]) <= 1e-4 for line in lines)
