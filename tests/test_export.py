"""ONNX export: every component, dynamic and static, external data, metadata, the command line, and
parity of each graph on ONNX Runtime against the torch module (fp32 max abs <= 1e-3)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ldm_engine.export import onnx_export  # noqa: E402
from ldm_engine.export.graphs import Shape, available_components  # noqa: E402
from ldm_engine.export.parity import onnx_parity  # noqa: E402
from ldm_engine.loading import random_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_sd1, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_sd1")
    return onnx_export.export_model(tiny_sd1, out, progress=False)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_each_component_matches_torch_on_onnxruntime(tiny_sd1, exported, component):
    path = exported[component]
    onnx.checker.check_model(str(path))
    # probed at batch 2 and a non-square size: not the traced shape, so the axes really are dynamic
    assert onnx_parity(tiny_sd1, component, path) <= 1e-3


@pytest.mark.parametrize("arch", ["tiny-sd2-v", "tiny-ldm-vq"])
def test_other_families_export_with_parity(arch, tmp_path):
    model = random_model(arch, seed=3)
    for component, path in onnx_export.export_model(model, tmp_path, progress=False).items():
        assert onnx_parity(model, component, path) <= 1e-3, component


def test_graphs_carry_shapes_and_metadata(exported):
    proto = onnx.load(str(exported["unet"]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ldm_engine.component"] == "unet" and meta["ldm_engine.shape"] == "dynamic"
    assert meta["ldm_engine.downsampling_factor"] == "2"
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2:] == ["height", "width"]
    assert len(proto.graph.value_info) > 0  # shape inference ran


def test_static_export_fixes_every_axis(tiny_sd1, tmp_path):
    import onnxruntime as ort

    shape = Shape.parse("32x48,1")
    path = onnx_export.export_component(tiny_sd1, "unet", tmp_path / "unet.onnx", shape=shape, progress=False)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 4, 16, 24]  # the CFG batch, latent size (factor 2)
    assert onnx_parity(tiny_sd1, "unet", path, shape) <= 1e-3
    from ldm_engine.backends.onnxruntime_backend import session_options

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):
        session.run(None, {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32),
                           "context": np.zeros((2, 77, 32), np.float32)})


def test_large_graphs_keep_weights_beside_the_protobuf(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)  # treat every graph as over 2 GB
    path = onnx_export.export_component(tiny_sd1, "vae_decoder", tmp_path / "vae_decoder.onnx", progress=False)
    data = tmp_path / "vae_decoder.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    onnx.checker.check_model(str(path))
    assert onnx_parity(tiny_sd1, "vae_decoder", path) <= 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx", "vae_decoder.onnx.data"]


@pytest.mark.parametrize("dtype,elem", [("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)])
def test_reduced_precision_exports(tiny_sd1, tmp_path, dtype, elem):
    path = onnx_export.export_component(tiny_sd1, "vae_decoder", tmp_path / "d.onnx", dtype=dtype, progress=False)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == elem
    assert {i.data_type for i in proto.graph.initializer if i.dims and len(i.dims) == 4} == {elem}  # conv weights
    assert str(next(tiny_sd1.vae.parameters()).dtype) == "torch.float32"  # the caller's module is left as it was


def test_a_failed_export_leaves_nothing(tiny_sd1, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="tracing failed"):
        onnx_export.export_component(tiny_sd1, "unet", tmp_path / "unet.onnx", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_name_the_problem(tiny_sd1, tmp_path):
    with pytest.raises(ValueError, match="multiples of 4"):  # autoencoder factor 2 x one UNet downsampling
        onnx_export.export_component(tiny_sd1, "unet", tmp_path / "u.onnx", shape=Shape(30, 32, 1), progress=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        onnx_export.export_component(tiny_sd1, "unet", tmp_path / "u.onnx", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="unknown component"):
        onnx_export.export_model(tiny_sd1, tmp_path, ["clip"], progress=False)
    with pytest.raises(ValueError, match="HxW,batch"):
        Shape.parse("512,1")
    assert available_components(random_model("tiny-ldm-vq")) == ["unet", "vae_decoder", "vae_encoder"]


def test_command_line_exports_and_verifies(tmp_path):
    out = tmp_path / "graphs"
    run = subprocess.run([sys.executable, str(REPO / "export" / "export_onnx.py"), "--arch", "tiny-sd1", "--out",
                          str(out), "--components", "text_encoder", "vae_decoder", "--verify"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stdout and "max abs vs torch" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder.onnx", "vae_decoder.onnx"]
    bad = subprocess.run([sys.executable, str(REPO / "export" / "export_onnx.py"), "--arch", "tiny-sd1", "--out",
                          str(out), "--static", "30x32"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiples of 4" in bad.stderr and "Traceback" not in bad.stderr
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder.onnx", "vae_decoder.onnx"]  # nothing new


@pytest.mark.slow
def test_full_size_unet_exports_with_external_data(tmp_path):
    """SD-1.5's UNet (3.4 GB in fp32) crosses the protobuf limit: weights go to one .data file, and the
    graph still matches torch on ONNX Runtime. Minutes and ~12 GB of memory: run with -m slow."""
    model = random_model("sd-1.5")
    path = onnx_export.export_component(model, "unet", tmp_path / "unet.onnx", progress=False)
    data = tmp_path / "unet.onnx.data"
    assert path.stat().st_size < 2 * 1024**2 and data.stat().st_size > 3 * 1024**3
    onnx.checker.check_model(str(path))
    assert onnx_parity(model, "unet", path, Shape(64, 64, 1)) <= 1e-3
