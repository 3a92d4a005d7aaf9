"""ControlNets on the graph backends (ONNX Runtime, OpenVINO): the ControlNet graph and the UNet graph
that takes its residuals against the torch modules (max abs <= 1e-4, fp32), whole images against the
torch backend (PSNR >= 40 dB fp32, >= 30 dB bf16): one ControlNet, two at once, guess mode, a 2-chunk
prompt; a LoRA taken in place by the unet_control graph; the artifact cache reusing a ControlNet's graph;
the refusals."""
from __future__ import annotations

import gc
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

from test_controlnet import _hint, make_controlnet  # noqa: E402

from ldm_engine.bench import psnr  # noqa: E402
from ldm_engine.control import read_controlnet  # noqa: E402
from ldm_engine.loading import load_checkpoint  # noqa: E402
from ldm_engine.pipeline import Pipeline  # noqa: E402

BACKENDS = ["onnxruntime", "openvino"]
LONG = ", ".join(["a painting of a fox in the snow"] * 10)  # 2 chunks: a (B, 154, D) context


def _needs(backend):
    pytest.importorskip("onnxruntime" if backend == "onnxruntime" else "openvino")


def _bf16_ok() -> bool:
    import openvino as ov

    from ldm_engine.backends.openvino_backend import cpu_supports_bf16

    return cpu_supports_bf16(ov.Core())


@pytest.fixture(scope="module")
def nets(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets_graphs")
    make_controlnet(sd1_folder, root / "a", seed=7)
    make_controlnet(sd1_folder, root / "b", seed=8)
    make_controlnet(sd1_folder, root / "pooled", seed=9)  # a "shuffle"-style ControlNet: (B, C, 1, 1) residuals
    config = json.loads((root / "pooled" / "config.json").read_text())
    (root / "pooled" / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    return root / "a", root / "b", root / "pooled"


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return load_checkpoint(sd1_folder)


@pytest.fixture(scope="module")
def torch_pipe(sd1):
    return Pipeline(sd1, "torch")


def _pipe(pipe, *paths):
    pipe.unload_controlnets()
    for p in paths:
        pipe.load_controlnet(p)
    return pipe


def _images(pipe, prompt="a red circle", **kw):
    args = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=24, seed=3, output_type="np",
                progress=False)
    return pipe(prompt, **{**args, **kw}).images


@pytest.mark.parametrize("backend", BACKENDS)
def test_graphs_match_the_modules(sd1, nets, backend):
    """The ControlNet graph's residuals and the unet_control graph's output at sizes and prompt lengths
    other than the traced ones (every axis dynamic; OpenVINO recompiles per shape, residuals included)."""
    _needs(backend)
    from ldm_engine.backends import make_backend

    b = make_backend(backend, sd1, dtype=torch.float32, progress=False)
    net = read_controlnet(nets[0], sd1.config.unet)
    b.prepare_controlnet(net)
    for (h, w), tokens in (((8, 12), 77), ((12, 8), 154)):
        x, ctx = torch.randn(2, 4, h, w), torch.randn(2, tokens, 32)
        hint, t = torch.rand(2, 3, 2 * h, 2 * w), torch.tensor([999.0, 20.0])
        with torch.no_grad():
            expected = net(x, hint, t, ctx)
            unet_ref = sd1.unet(x, t, ctx, control=expected)
        got = b.controlnet(net, x, t, ctx, hint)
        assert [r.shape for r in got] == [r.shape for r in expected]
        err = max((g - e).abs().max().item() for g, e in zip(got, expected))
        print(f"{backend} {h}x{w} {tokens} tokens: residuals max abs {err:.2e}")
        assert err <= 1e-4
        out = b.denoise(x, t, ctx, {"control": expected})
        err = (out - unet_ref).abs().max().item()
        print(f"{backend} {h}x{w}: UNet with residuals max abs {err:.2e}")
        assert err <= 1e-4
    key = b._control_key(net)
    if backend == "openvino":
        assert len(b._compiled["unet_control"]) == 2 and len(b._compiled[key]) == 2
    b.reload("unet")  # new UNet weights (a LoRA): the UNet graph with residuals goes, the ControlNet's stays
    assert key in b._loaded_keys() and "unet_control" not in b._loaded_keys()
    del net, expected, got
    gc.collect()
    assert key not in b._loaded_keys()  # an unloaded ControlNet's session goes with it


def test_graph_names_and_axes(sd1, nets, tmp_path):
    import onnx

    from ldm_engine.export.control_graphs import residual_layout
    from ldm_engine.export.onnx_export import export_component

    net = read_controlnet(nets[0], sd1.config.unet)
    layout = residual_layout(sd1.config.unet)
    assert [(n, c, d) for n, c, d in layout] == [("down_0", 32, 1), ("down_1", 32, 1), ("down_2", 32, 1),
                                                   ("down_3", 32, 2), ("down_4", 64, 2), ("down_5", 64, 2),
                                                   ("mid", 64, 2)]
    path = export_component(sd1, "controlnet", tmp_path / "cn.onnx", progress=False, controlnet=net)
    g = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.output]}
    assert [i.name for i in g.input] == ["sample", "timestep", "context", "hint"]
    assert [o.name for o in g.output] == [n for n, _, _ in layout]
    assert dims["hint"] == ["batch", 3, "pixel_height", "pixel_width"] and dims["context"] == ["batch", "tokens", 32]
    assert dims["down_4"] == ["batch", 64, "height/2", "width/2"]
    with pytest.raises(ValueError, match="controlnet="):
        export_component(sd1, "controlnet", tmp_path / "x.onnx", progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one", "two", "guess", "long", "pooled"])
def test_images_match_torch(sd1, torch_pipe, nets, backend, case):
    _needs(backend)
    pipe = Pipeline(sd1, backend, dtype=torch.float32, progress=False)
    kw = dict(control_image=_hint(1), controlnet_conditioning_scale=0.8)
    paths = nets[:1]
    if case == "two":
        paths, kw = nets[:2], dict(control_image=[_hint(1), _hint(2)], controlnet_conditioning_scale=[0.6, 1.3],
                               control_guidance_start=[0.0, 0.3], control_guidance_end=[0.7, 1.0],
                               num_images_per_prompt=2)
    elif case == "guess":
        kw |= dict(guess_mode=True, controlnet_conditioning_scale=1.5)
    elif case == "pooled":
        paths = nets[2:]
    elif case == "long":
        kw |= dict(prompt=LONG, negative_prompt="blurry")
        assert len(torch_pipe.prompts.chunks(LONG)) == 2
    ref = _images(_pipe(torch_pipe, *paths), **kw)
    out = _images(_pipe(pipe, *paths), **kw)
    assert "unet_control" in pipe.backend._loaded_keys()  # the residuals went through the graphs
    assert sum(k.startswith("controlnet#") for k in pipe.backend._loaded_keys()) == len(paths)
    without = _images(_pipe(torch_pipe), **{k: v for k, v in kw.items() if k in ("prompt", "negative_prompt", "num_images_per_prompt")})
    db = psnr(ref, out)
    print(f"{backend} {case}: {db:.1f} dB against torch (without control: {psnr(ref, without):.1f} dB)")
    assert np.isfinite(out).all() and db >= 40
    assert np.abs(ref - without).max() > 4 / 255  # the control changed the image


def test_openvino_bf16_matches_torch(sd1, torch_pipe, nets):
    pytest.importorskip("openvino")
    if not _bf16_ok():
        pytest.skip("this CPU has no bf16 instructions (AVX512_BF16 / AMX)")
    pipe = _pipe(Pipeline(sd1, "openvino", dtype=torch.bfloat16, progress=False), nets[0])
    kw = dict(control_image=_hint(1), controlnet_conditioning_scale=0.8)
    ref = _images(_pipe(torch_pipe, nets[0]), **kw)
    out = _images(pipe, **kw)
    key = pipe.backend._control_key(pipe.control.loaded[0].module)
    assert {"unet_control", key} <= set(pipe.backend._embed_outside)  # both time embeddings computed in f32
    db = psnr(ref, out)
    print(f"openvino bf16: {db:.1f} dB against torch fp32")
    assert np.isfinite(out).all() and db >= 30


def test_openvino_cuts_the_timestep_embedding_of_both_graphs(sd1, nets):
    """The bf16 path's graph surgery on the ControlNet and unet_control graphs, checked in f32 (so it runs on
    any CPU): the embedding fed in from outside gives the modules' outputs."""
    pytest.importorskip("openvino")
    from ldm_engine.backends.openvino_backend import OpenVINOBackend

    b = OpenVINOBackend(sd1, dtype=torch.float32, progress=False)
    b.precision = "bf16"  # what _read checks before cutting; the graphs still compile with the f32 hint
    net = read_controlnet(nets[0], sd1.config.unet)
    b.prepare_controlnet(net)
    x, ctx, hint = torch.randn(2, 4, 8, 12), torch.randn(2, 77, 32), torch.rand(2, 3, 16, 24)
    t = torch.tensor([999.0, 1.0])
    with torch.no_grad():
        expected = net(x, hint, t, ctx)
        unet_ref = sd1.unet(x, t, ctx, control=expected)
    got = b.controlnet(net, x, t, ctx, hint)
    out = b.denoise(x, t, ctx, {"control": expected})
    assert b._embed_outside == {"unet_control": 32, b._control_key(net): 32}
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) <= 1e-4
    assert (out - unet_ref).abs().max().item() <= 1e-4


def test_second_pipeline_reuses_the_controlnet_graph(sd1, nets, monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    from ldm_engine.export import artifacts

    calls = []
    real = artifacts.export_component
    monkeypatch.setattr(artifacts, "export_component", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    for run in range(2):
        pipe = _pipe(Pipeline(sd1, "onnxruntime", progress=False, cache_dir=tmp_path), nets[1])
        _images(pipe, control_image=_hint(3), num_inference_steps=1)
        if run == 0:
            assert sorted(calls) == ["controlnet", "text_encoder", "unet_control", "vae_decoder"]
            calls.clear()
    assert calls == []  # the second pipeline found every graph in the cache
    keys = {artifacts.controlnet_key(sd1, read_controlnet(p, sd1.config.unet)) for p in nets}
    assert len(keys) == len(nets)  # keyed by the ControlNet's own weights


def test_refusals(sd1, nets, tmp_path):
    pytest.importorskip("onnxruntime")
    from ldm_engine.control.manager import ControlNets

    pipe = Pipeline(sd1, "onnxruntime", progress=False, onnx_dir=tmp_path)  # a folder without ControlNet graphs
    with pytest.raises(FileNotFoundError, match="onnx_dir .* has no unet_control.onnx.*--controlnet FILE"):
        pipe.load_controlnet(nets[0])
    assert pipe.controlnets == []
    other = ControlNets(sd1, SimpleNamespace(name="other"))
    with pytest.raises(ValueError, match="other backend does not run ControlNets.*'openvino' or 'tensorrt'"):
        other.load(nets[0])


def test_tensorrt_profiles_for_the_controlnet_graphs(sd1, nets, tmp_path):
    """Engine profiles of both graphs (no GPU needed): the CFG batch, residuals at each UNet level's size,
    the hint at pixel size; the ControlNet's minimum batch without the pair (guess mode)."""
    from ldm_engine.backends.tensorrt_backend import TensorRTBackend
    from ldm_engine.export.graphs import Shape
    from ldm_engine.export.onnx_export import export_component
    from ldm_engine.export.trt_engines import profile_for, read_graph

    assert TensorRTBackend.accepts_control  # tests/test_tensorrt_control.py: its engines and their checks
    net = read_controlnet(nets[0], sd1.config.unet)
    lo, opt, hi = Shape(16, 16, 1), Shape(32, 48, 2), Shape(64, 64, 4)
    cn = profile_for(read_graph(export_component(sd1, "controlnet", tmp_path / "cn.onnx", progress=False,
                                                 controlnet=net)), lo, opt, hi)
    assert cn["sample"] == ((1, 4, 8, 8), (4, 4, 16, 24), (8, 4, 32, 32))
    assert cn["hint"] == ((1, 3, 16, 16), (4, 3, 32, 48), (8, 3, 64, 64))
    assert cn["context"] == ((1, 77, 32), (4, 77, 32), (8, 231, 32))
    unet = profile_for(read_graph(export_component(sd1, "unet_control", tmp_path / "uc.onnx", progress=False)),
                       lo, opt, hi)
    assert unet["sample"] == ((2, 4, 8, 8), (4, 4, 16, 24), (8, 4, 32, 32))
    assert unet["down_0"] == ((2, 32, 8, 8), (4, 32, 16, 24), (8, 32, 32, 32))
    assert unet["mid"] == ((2, 64, 4, 4), (4, 64, 8, 12), (8, 64, 16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lora_reaches_the_unet_graph_with_residuals(nets, tmp_path, backend, monkeypatch):
    """A LoRA merged into the UNet: the unet_control graph keeps the graph of the original weights and takes
    the changed tensors in place (exported once across load / unload), the ControlNet's graph is kept; the
    image matches torch with the same LoRA and ControlNet, and the plain one again after the unload."""
    _needs(backend)
    from test_lora_backends import lora_file

    from ldm_engine.export import artifacts
    from ldm_engine.loading import random_model

    calls = []
    real = artifacts.export_component
    monkeypatch.setattr(artifacts, "export_component", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    lora = lora_file(tmp_path / "style.safetensors")
    kw = dict(control_image=_hint(1), height=16, width=16)
    ref = _pipe(Pipeline(random_model("tiny-sd1", seed=11)), nets[0])
    plain = _images(ref, **kw)
    ref.load_lora(lora, 0.9)
    pipe = _pipe(Pipeline(random_model("tiny-sd1", seed=11), backend, dtype=torch.float32, progress=False,
                          cache_dir=tmp_path / "cache"), nets[0])
    before = _images(pipe, **kw)
    pipe.load_lora(lora, 0.9)
    expected, out = _images(ref, **kw), _images(pipe, **kw)
    pipe.unload_loras()
    again = _images(pipe, **kw)
    db = psnr(expected, out)
    print(f"LoRA + ControlNet, {backend}: {db:.1f} dB against torch (before the LoRA {psnr(expected, before):.1f} dB, "
          f"after the unload {psnr(plain, again):.1f} dB against plain torch)")
    assert db >= 40 and psnr(expected, before) < 40 and psnr(plain, again) >= 40
    assert calls.count("unet_control") == 1 and calls.count("controlnet") == 1, calls
    assert "unet" not in calls  # every step had control: the plain UNet graph was never needed
