"""The GPU-free parts of ControlNets on TensorRT: engine profiles of the controlnet and unet_control graphs
(every residual input at its UNet level's size, the CFG batch and guess mode's conditional half), engine
cache keys carrying the ControlNet's weights hash, engine_dir checks (name and weights), the backend's
controlnet() / denoise(extra["control"]) feeds with a stand-in engine, and build_trt.py --controlnet."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")

from test_controlnet import make_controlnet  # noqa: E402

from ldm_engine.control import read_controlnet  # noqa: E402
from ldm_engine.export.control_graphs import controlnet_weights_hash, residual_layout  # noqa: E402
from ldm_engine.export.graphs import Shape  # noqa: E402
from ldm_engine.export.trt_engines import (EngineError, check_control_engine, engine_record,  # noqa: E402
                                           fits_profile, profile_for, read_graph, write_record)
from ldm_engine.loading import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LO, OPT, HI = Shape(16, 16, 1), Shape(32, 48, 2), Shape(64, 64, 4)


@pytest.fixture(scope="module")
def graphs(sd1_folder, tmp_path_factory):
    """The UNet graph and the ControlNet graphs of two ControlNets with the same stem (named cn, cn_2)."""
    from ldm_engine.export.export_onnx import main

    root = tmp_path_factory.mktemp("trt_control")
    make_controlnet(sd1_folder, root / "a" / "cn", seed=7)
    make_controlnet(sd1_folder, root / "b" / "cn", seed=8)
    out = root / "graphs"
    assert main(["--model", str(sd1_folder), "--out", str(out), "--components", "unet",
                 "--controlnet", str(root / "a" / "cn"), "--controlnet", str(root / "b" / "cn")]) == 0
    return load_checkpoint(sd1_folder), out, root / "a" / "cn", root / "b" / "cn"


def test_profiles_cover_the_cfg_batch_and_guess_mode(graphs):
    model, out, _, _ = graphs
    layout = residual_layout(model.config.unet)
    unet = profile_for(read_graph(out / "unet_control.onnx"), LO, OPT, HI)
    for name, ch, ds in layout:  # every residual at its level's latent size, the CFG batch throughout
        assert unet[name] == ((2, ch, 8 // ds, 8 // ds), (4, ch, 16 // ds, 24 // ds), (8, ch, 32 // ds, 32 // ds)), name
    cn_info = read_graph(out / "controlnet_cn.onnx")
    assert cn_info.component == "controlnet" and list(cn_info.inputs) == ["sample", "timestep", "context", "hint"]
    cn = profile_for(cn_info, LO, OPT, HI)
    assert cn["sample"] == ((1, 4, 8, 8), (4, 4, 16, 24), (8, 4, 32, 32))  # guess mode's 1 x images at the minimum
    assert cn["hint"] == ((1, 3, 16, 16), (4, 3, 32, 48), (8, 3, 64, 64))
    assert cn["timestep"] == ((1,), (4,), (8,))
    record = engine_record(cn_info, cn, "fp16", "11.4.0", "NVIDIA H100", refit=False)
    for b in (OPT.batch, 2 * OPT.batch, HI.batch, 2 * HI.batch):  # guess mode and CFG calls both fit
        assert fits_profile(record, {"sample": (b, 4, 16, 24), "timestep": (b,), "context": (b, 154, 32),
                                     "hint": (b, 3, 32, 48)})
    assert not fits_profile(record, {"sample": (2, 4, 40, 40), "timestep": (2,), "context": (2, 77, 32),
                                     "hint": (2, 3, 80, 80)})


def test_engine_cache_keys_carry_the_weights(graphs):
    from ldm_engine.backends.tensorrt_backend import engine_cache_key, weights_of
    from ldm_engine.export.artifacts import controlnet_key, onnx_key
    from ldm_engine.export.cache import weights_hash

    model, _, a, b = graphs
    na, nb = read_controlnet(a, model.config.unet), read_controlnet(b, model.config.unet)
    ka = engine_cache_key(controlnet_key(model, na, "fp16"), "11.4.0", "NVIDIA H100 80GB", "fp16", False)
    kb = engine_cache_key(controlnet_key(model, nb, "fp16"), "11.4.0", "NVIDIA H100 80GB", "fp16", False)
    assert ka != kb  # the ControlNet's own weights hash: another net, another engine
    with torch.no_grad():
        na.zero_convs[0][0].bias.add_(1.0)
    assert engine_cache_key(controlnet_key(model, na, "fp16"), "11.4.0", "NVIDIA H100 80GB", "fp16", False) != ka
    assert ka.startswith("controlnet-") and ka.endswith("-trt11.4.0-NVIDIA_H100_80GB-fp16")
    ku = engine_cache_key(onnx_key(model, "unet_control", "fp16"), "11.4.0", "NVIDIA H100 80GB", "fp16", True)
    assert ku.startswith(f"unet_control-{weights_hash(model.unet, model.config.unet)}-") and ku.endswith("-fp16-refit")
    assert weights_of("unet_control") == "unet" and weights_of(f"controlnet#{controlnet_weights_hash(na)}") is None


def _fake_engine(folder: Path, stem: str, extra: dict | None = None) -> Path:
    engine = folder / f"{stem}.plan"
    engine.write_bytes(b"serialized engine")
    record = {"component": stem, "tensorrt": "11.4.0", "gpu": "NVIDIA H100", "refit": False,
              "profile": {}, **(extra or {})}
    write_record(engine, record)
    return engine


def test_engine_dir_finds_a_controlnet_by_name_and_weights(graphs, tmp_path):
    from ldm_engine.backends.tensorrt_backend import TensorRTBackend

    model, _, a, b = graphs
    na, nb = read_controlnet(a, model.config.unet), read_controlnet(b, model.config.unet)
    ha = controlnet_weights_hash(na)
    with pytest.raises(EngineError, match="no unet_control.plan .*build_trt.py .*--controlnet FILE"):
        check_control_engine(tmp_path, "cn", ha)
    _fake_engine(tmp_path, "unet_control")
    with pytest.raises(EngineError, match=r"no engine for ControlNet 'cn' \(controlnet_cn.plan"):
        check_control_engine(tmp_path, "cn", ha)
    engine = _fake_engine(tmp_path, "controlnet_cn", {"controlnet": {"name": "cn", "weights_hash": ha}})
    assert check_control_engine(tmp_path, "cn", ha) == engine
    backend = object.__new__(TensorRTBackend)  # the pure checks need no GPU, so no constructor
    backend.engine_dir, backend._control_nets, backend._control_files = tmp_path, {}, {}
    backend.prepare_controlnet(na, "cn")
    assert backend._control_files == {f"controlnet#{ha}": engine}
    with pytest.raises(EngineError, match=r"ControlNet 'cn' has other weights .* build this one with"):
        backend.prepare_controlnet(nb, "cn")
    assert list(backend._control_files) == [f"controlnet#{ha}"]  # nothing kept of the refused one


class _Recorder:
    """A stand-in engine: records its feeds, answers zeros of the graph's output shapes."""

    def __init__(self, outputs):
        self.outputs, self.feeds, self.dtypes = outputs, None, {}

    def run_all(self, feeds, stream):
        self.feeds = feeds
        return {name: torch.zeros(shape(feeds)) for name, shape in self.outputs.items()}

    def run(self, feeds, stream):
        return next(iter(self.run_all(feeds, stream).values()))


def test_backend_feeds_the_control_engines(graphs, monkeypatch):
    from collections import defaultdict

    from ldm_engine.backends.tensorrt_backend import TensorRTBackend

    model, _, a, _ = graphs
    net = read_controlnet(a, model.config.unet)
    layout = residual_layout(model.config.unet)
    outs = {n: (lambda f, ch=ch, ds=ds: (f["sample"].shape[0], ch, f["sample"].shape[2] // ds,
                                         f["sample"].shape[3] // ds)) for n, ch, ds in reversed(layout)}
    engines = {"controlnet": _Recorder(outs), "unet_control": _Recorder({"model_output": lambda f: f["sample"].shape})}
    for e in engines.values():
        e.dtypes = defaultdict(lambda: torch.float32)
    backend = object.__new__(TensorRTBackend)
    backend.model, backend.device, backend.cuda_graph, backend.engine_dir = model, torch.device("cpu"), False, None
    backend._control_nets, backend._control_files = {}, {}
    backend.engine = lambda key: engines["controlnet" if key.startswith("controlnet#") else key]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    backend.prepare_controlnet(net, "cn")
    x, ctx, hint = torch.randn(1, 4, 8, 12), torch.randn(1, 77, 32), torch.rand(1, 3, 16, 24)
    res = backend.controlnet(net, x, 999, ctx, hint)  # guess mode: the conditional half alone, batch 1
    assert [tuple(r.shape) for r in res] == [(1, ch, 8 // ds, 12 // ds) for _, ch, ds in layout]  # in layout order
    assert set(engines["controlnet"].feeds) == {"sample", "timestep", "context", "hint"}
    assert engines["controlnet"].feeds["timestep"].tolist() == [999.0]
    z = torch.randn(2, 4, 8, 12)
    pooled = [torch.randn(2, ch, 1, 1) for _, ch, _ in layout]  # a global-pooling ControlNet's residuals
    out = backend.denoise(z, 999, torch.randn(2, 77, 32), {"control": pooled})
    feeds = engines["unet_control"].feeds
    assert out.shape == z.shape and list(feeds)[:3] == ["sample", "timestep", "context"]
    assert [tuple(feeds[n].shape) for n, _, _ in layout] == [(2, ch, 8 // ds, 12 // ds) for _, ch, ds in layout]
    with pytest.raises(ValueError, match="control needs 7 residuals"):
        backend.denoise(z, 999, torch.randn(2, 77, 32), {"control": pooled[:3]})


def _build_trt(*args):
    return subprocess.run([sys.executable, str(REPO / "export" / "build_trt.py"), *args], capture_output=True,
                          text=True)


def test_build_trt_plans_the_control_engines(graphs, tmp_path):
    from ldm_engine.export.build_trt import parse_args, plan

    model, out, a, b = graphs
    _, args = parse_args(["--onnx", str(out), "--out", str(tmp_path), "--controlnet", str(a), "--controlnet", str(b),
                          "--min", "16x16", "--max", "64x64,2"])
    assert args.controlnet == [a, b]
    jobs = plan(args)
    assert [j[0] for j in jobs] == ["unet", "unet_control", "controlnet_cn", "controlnet_cn_2"]
    extra = {j[0]: j[4] for j in jobs}
    hb = controlnet_weights_hash(read_controlnet(b, model.config.unet))
    assert extra["controlnet_cn_2"]["controlnet"] == {"name": "cn_2", "weights_hash": hb, "source": str(b)}
    assert extra["unet"] is None and extra["unet_control"] is None
    assert jobs[3][3]["sample"][0] == (1, 4, 8, 8)  # guess mode's batch at the minimum


def test_build_trt_control_requests_exit_2(graphs, tmp_path, capsys):
    import importlib.util

    from ldm_engine.export.build_trt import main

    model, out, a, b = graphs
    base = ["--onnx", str(out), "--out", str(tmp_path / "eng"), "--min", "16x16", "--max", "64x64,2"]
    bad = [(["--controlnet", str(tmp_path / "none")], "no such ControlNet"),
           (["--controlnet", str(b)], f"{b} is not the file whose graph {out} holds as 'cn'"),
           (["--controlnet", str(a), "--controlnet", str(a.parent)], "has no graph for ControlNet 'a'")]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "unet.onnx").symlink_to(out / "unet.onnx")
    bad.append((["--onnx", str(plain), "--controlnet", str(a)], "has no unet_control.onnx"))
    for args, message in bad:  # refused by the plan, before anything needs a GPU
        rc = main(base + args)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err)
    if importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        return
    run = _build_trt(*base, "--controlnet", str(a))  # a good request: only the GPU is missing
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1
    assert "TensorRT is not installed" in lines[0] or "No CUDA device" in lines[0]
    assert not (tmp_path / "eng").exists()


def test_side_file_records_the_controlnet(graphs, tmp_path):
    model, out, a, _ = graphs
    info = read_graph(out / "controlnet_cn.onnx")
    profile = profile_for(info, LO, OPT, HI)
    extra = {"controlnet": {"name": "cn", "weights_hash": "0123", "source": str(a)}}
    record = engine_record(info, profile, "fp16", "11.4.0", "NVIDIA H100", False, extra)
    engine = tmp_path / "controlnet_cn.plan"
    engine.write_bytes(b"x")
    write_record(engine, record)
    assert json.loads(engine.with_suffix(".json").read_text())["controlnet"]["weights_hash"] == "0123"
