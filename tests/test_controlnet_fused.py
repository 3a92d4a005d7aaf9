"""The fused UNet + ControlNet graph (TensorRT demo/Diffusion's layout, exported for measurement): on ONNX
Runtime it equals the controlnet graph + unet_control graph and the torch modules (max abs <= 1e-4, fp32),
with a plain conditioning scale and with guess mode (the ramp, and the unconditional half's zero rows, as
control_scales data); and benchmarks/control_layouts.py runs end to end on a tiny architecture."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_controlnet import make_controlnet  # noqa: E402

from ldm_engine.control import read_controlnet  # noqa: E402
from ldm_engine.loading import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graphs(sd1_folder, tmp_path_factory):
    from ldm_engine.export.onnx_export import export_component

    out = tmp_path_factory.mktemp("fused")
    model = load_checkpoint(sd1_folder)
    make_controlnet(sd1_folder, out / "cn", seed=5)
    net = read_controlnet(out / "cn", model.config.unet)
    paths = {c: export_component(model, c, out / f"{c}.onnx", progress=False, controlnet=net)
             for c in ("controlnet", "unet_control", "unet_control_fused")}
    return model, net, paths


def _session(path):
    import onnxruntime as ort

    from ldm_engine.backends.onnxruntime_backend import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def test_graph_inputs(graphs):
    import onnx

    model, net, paths = graphs
    g = onnx.load(str(paths["unet_control_fused"])).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.input}
    assert list(dims) == ["sample", "timestep", "context", "hint", "control_scales"]
    assert dims["control_scales"] == ["batch", net.control_config.num_residuals]
    assert dims["hint"] == ["batch", 3, "pixel_height", "pixel_width"]
    assert [o.name for o in g.output] == ["model_output"]


@pytest.mark.parametrize("guess", [False, True])
def test_fused_equals_split_and_torch(graphs, guess):
    """At a size and prompt length other than the traced ones (every axis dynamic)."""
    model, net, paths = graphs
    n = net.control_config.num_residuals
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 154, 32, generator=g)
    hint, t = torch.rand(2, 3, 16, 24, generator=g), torch.tensor([999.0, 999.0])
    if guess:  # diffusers' ramp on the conditional half [uncond; cond], nothing on the unconditional one
        ramp = torch.logspace(-1, 0, n) * 1.5
        scales = torch.stack([torch.zeros(n), ramp])
    else:
        scales = torch.full((2, n), 0.8)
    with torch.no_grad():
        if guess:  # the torch path: the ControlNet sees the conditional half only
            cond = net(x[1:], hint[1:], t[1:], ctx[1:], scale=list(ramp))
            res = [torch.cat([torch.zeros_like(r), r]) for r in cond]
        else:
            res = net(x, hint, t, ctx, scale=0.8)
        expected = model.unet(x, t, ctx, control=res).numpy()
    fused = _session(paths["unet_control_fused"]).run(None, {
        "sample": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy(), "hint": hint.numpy(),
        "control_scales": scales.numpy()})[0]
    # the split layout, handing the residuals over in numpy as the graph backends do
    raw = _session(paths["controlnet"]).run(None, {"sample": x.numpy(), "timestep": t.numpy(), "context": ctx.numpy(),
                                                   "hint": hint.numpy()})
    names = [i.name for i in _session(paths["unet_control"]).get_inputs()][3:]
    feeds = {name: r * scales[:, i, None, None, None].numpy() for i, (name, r) in enumerate(zip(names, raw))}
    split = _session(paths["unet_control"]).run(None, {"sample": x.numpy(), "timestep": t.numpy(),
                                                        "context": ctx.numpy(), **feeds})[0]
    err_split, err_torch = np.abs(fused - split).max(), np.abs(fused - expected).max()
    print(f"guess={guess}: fused vs split max abs {err_split:.2e}, vs torch {err_torch:.2e}")
    assert err_split <= 1e-4 and err_torch <= 1e-4
    assert np.abs(expected - model.unet(x, t, ctx).detach().numpy()).max() > 1e-3  # the control mattered


def test_fused_needs_a_controlnet(graphs, tmp_path):
    from ldm_engine.export.onnx_export import export_component

    model, _, _ = graphs
    with pytest.raises(ValueError, match="unet_control_fused graph is made from a ControlNet: pass controlnet="):
        export_component(model, "unet_control_fused", tmp_path / "x.onnx", progress=False)
    assert not (tmp_path / "x.onnx").exists()


def test_control_layouts_benchmark_runs_on_a_tiny_arch(tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "control_layouts.py"), "--arch", "tiny-sd1",
                          "--res", "32", "--precision", "f32", "--repeat", "2", "--graphs", str(tmp_path / "g"),
                          "--json", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())
    assert row["arch"] == "tiny-sd1" and row["precision"] == "f32" and row["batch"] == 2
    assert row["split_s"] > 0 and row["fused_s"] > 0 and row["split_over_fused"] == pytest.approx(
        row["split_s"] / row["fused_s"])
    assert row["max_abs_split_vs_fused"] <= 1e-4
    assert "| layout |" in run.stdout and row["cpu"] in run.stdout


def test_control_layouts_refuses_bf16_without_bf16_instructions(tmp_path):
    pytest.importorskip("openvino")
    import openvino as ov

    from ldm_engine.backends.openvino_backend import cpu_supports_bf16

    if cpu_supports_bf16(ov.Core()):
        pytest.skip("this CPU has bf16 instructions")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "control_layouts.py"), "--arch", "tiny-sd1",
                          "--precision", "bf16"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "AVX512_BF16" in run.stderr and "--precision f32" in run.stderr
