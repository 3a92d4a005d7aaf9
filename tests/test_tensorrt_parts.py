"""The parts of the TensorRT path that need no GPU: shapes and profiles, precision plans, engine side
files and their checks, and build_trt.py's exit without TensorRT or a CUDA device."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")

from ldm_engine.export.graphs import Shape  # noqa: E402
from ldm_engine.export.onnx_export import export_model  # noqa: E402
from ldm_engine.export.trt_engines import (EngineError, check_record, engine_record, fits_profile,  # noqa: E402
                                           precision_plan, profile_for, read_graph, resolve_shapes, write_record)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graphs(tiny_sd1, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt_graphs")
    export_model(tiny_sd1, out, progress=False)
    static = tmp_path_factory.mktemp("trt_static")
    export_model(tiny_sd1, static, ["unet"], shape=Shape(32, 32, 1), progress=False)
    return out, static


def test_profiles_size_the_cfg_batch_and_latents(graphs):
    out, _ = graphs
    lo, opt, hi = Shape(16, 16, 1), Shape(32, 48, 2), Shape(64, 64, 4)
    unet = profile_for(read_graph(out / "unet.onnx"), lo, opt, hi)
    assert unet["sample"] == ((2, 4, 8, 8), (4, 4, 16, 24), (8, 4, 32, 32))  # 2 x images, latent = pixels / 2
    assert unet["timestep"] == ((2,), (4,), (8,))
    assert unet["context"] == ((2, 77, 32), (4, 77, 32), (8, 231, 32))  # prompts of 1 to 3 chunks
    text = profile_for(read_graph(out / "text_encoder.onnx"), lo, opt, hi)
    assert text["input_ids"] == ((2, 77), (4, 77), (24, 77))  # prompts and negatives, a row per chunk
    dec = profile_for(read_graph(out / "vae_decoder.onnx"), lo, opt, hi)
    assert dec["latent"] == ((1, 4, 8, 8), (2, 4, 16, 24), (4, 4, 32, 32))
    enc = profile_for(read_graph(out / "vae_encoder.onnx"), lo, opt, hi)
    assert enc["image"] == ((1, 3, 16, 16), (2, 3, 32, 48), (4, 3, 64, 64))  # pixels


def test_profile_errors(graphs):
    out, static = graphs
    info = read_graph(out / "unet.onnx")
    with pytest.raises(ValueError, match="grow from min to opt to max"):
        profile_for(info, Shape(64, 64, 1), Shape(32, 32, 1), Shape(64, 64, 1))
    with pytest.raises(ValueError, match="multiples of 4 for this model"):
        profile_for(info, Shape(14, 16, 1), Shape(16, 16, 1), Shape(16, 16, 1))
    s = read_graph(static / "unet.onnx")
    assert profile_for(s, *[Shape(32, 32, 1)] * 3)["sample"] == ((2, 4, 16, 16),) * 3
    with pytest.raises(ValueError, match="static shapes"):
        profile_for(s, Shape(16, 16, 1), Shape(32, 32, 1), Shape(32, 32, 1))


def test_shape_arguments_resolve():
    s = Shape.parse
    assert resolve_shapes(s("512x512,2"), None, None, None, s("64x64")) == (s("512x512,2"),) * 3
    assert resolve_shapes(None, s("256x256"), None, s("768x768,4"), s("512x512")) == (
        s("256x256"), s("768x768,4"), s("768x768,4"))
    assert resolve_shapes(None, None, None, None, s("512x512")) == (s("512x512"),) * 3
    with pytest.raises(ValueError, match="not both"):
        resolve_shapes(s("512x512"), s("256x256"), None, None, s("512x512"))


def test_precision_plans_per_tensorrt_version():
    assert precision_plan(11, "fp16", "fp16") is None  # strongly typed: the graph decides
    assert precision_plan(10, "fp32", "fp16") == "FP16"  # weakly typed builder flag
    assert precision_plan(10, "fp32", "bf16") == "BF16"
    assert precision_plan(11, "fp32", "fp32") is None
    with pytest.raises(ValueError, match="--dtype fp16"):
        precision_plan(11, "fp32", "fp16")
    with pytest.raises(ValueError, match="exported in fp16"):
        precision_plan(10, "fp16", "fp32")


def test_engine_side_files_are_checked(graphs, tmp_path):
    out, _ = graphs
    info = read_graph(out / "unet.onnx")
    profile = profile_for(info, Shape(16, 16, 1), Shape(32, 32, 1), Shape(64, 64, 2))
    engine = tmp_path / "unet.plan"
    engine.write_bytes(b"serialized engine")
    write_record(engine, engine_record(info, profile, "fp16", "11.4.0", "NVIDIA H100", refit=False))
    record = check_record(engine, "11.4.0", "NVIDIA H100", info.source_hash)
    assert record["precision"] == "fp16"
    with pytest.raises(EngineError, match="built by TensorRT 11.4.0, this is 10.9.0"):
        check_record(engine, "10.9.0", "NVIDIA H100")
    with pytest.raises(EngineError, match="built for NVIDIA H100, this GPU is NVIDIA L4"):
        check_record(engine, "11.4.0", "NVIDIA L4")
    with pytest.raises(EngineError, match="different ONNX graph"):
        check_record(engine, "11.4.0", "NVIDIA H100", "0" * 32)
    assert fits_profile(record, {"sample": (4, 4, 16, 16), "timestep": (4,), "context": (4, 77, 32)})
    assert not fits_profile(record, {"sample": (2, 4, 40, 40), "timestep": (2,), "context": (2, 77, 32)})
    engine.with_suffix(".json").write_text("{not json")
    with pytest.raises(EngineError, match="side file"):
        check_record(engine, "11.4.0", "NVIDIA H100")
    with pytest.raises(EngineError, match="missing"):
        check_record(tmp_path / "absent.plan", "11.4.0", "NVIDIA H100")


def test_the_source_hash_follows_the_graph(graphs, tmp_path):
    out, _ = graphs
    a = read_graph(out / "vae_decoder.onnx").source_hash
    copy = tmp_path / "vae_decoder.onnx"
    data = bytearray((out / "vae_decoder.onnx").read_bytes())
    copy.write_bytes(bytes(data))
    assert read_graph(copy).source_hash == a
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert read_graph(copy).source_hash != a


def _build_trt(*args):
    return subprocess.run([sys.executable, str(REPO / "export" / "build_trt.py"), *args], capture_output=True, text=True)


def test_build_trt_without_tensorrt_exits_2_with_one_sentence(graphs, tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    out, _ = graphs
    run = _build_trt("--onnx", str(out), "--out", str(tmp_path / "eng"), "--min", "16x16", "--max", "64x64,2")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and ("TensorRT is not installed" in lines[0] or "No CUDA device" in lines[0])
    assert not (tmp_path / "eng").exists()


def test_build_trt_rejects_bad_requests_before_building(graphs, tmp_path):
    out, static = graphs
    bad = [(["--onnx", str(tmp_path / "none"), "--out", str(tmp_path)], "not a folder"),
           (["--onnx", str(out), "--out", str(tmp_path), "--min", "64x64", "--max", "32x32"], "grow from min"),
           (["--onnx", str(out), "--out", str(tmp_path), "--static", "16x16", "--opt", "32x32"], "not both"),
           (["--onnx", str(static), "--out", str(tmp_path), "--min", "16x16", "--max", "32x32"], "static shapes"),
           (["--onnx", str(static), "--out", str(tmp_path), "--components", "vae_decoder"], "no vae_decoder")]
    for args, message in bad:
        run = _build_trt(*args)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_graph_metadata_is_required(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), str(tmp_path / "unet.onnx"))
    with pytest.raises(EngineError, match="not exported by ldm_engine"):
        read_graph(tmp_path / "unet.onnx")
