"""New weights in an exported graph without exporting it again: the initializer map and both runtimes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_engine.export import weight_overrides as wo
from ldm_engine.export.onnx_export import export_component


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ldm_engine.loading import random_model

    model = random_model("tiny-sd1")
    path = export_component(model, "unet", tmp_path_factory.mktemp("unet") / "model.onnx", progress=False)
    return model, path


def _edited(model, fraction_of_names: str = "attn"):
    """A copy of the UNet with every attention Linear and conv weight of the first res block changed."""
    import copy

    unet = copy.deepcopy(model.unet)
    g = torch.Generator().manual_seed(0)
    changed = {}
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim in (2, 4) and (fraction_of_names in name or name.startswith("input_blocks.1.0.in_layers.2")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
                changed[name] = p
    return unet, changed


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g).numpy(), "timestep": np.full((2,), 500.0, np.float32),
            "context": torch.randn(2, 77, model.config.unet.context_dim, generator=g).numpy()}


def test_every_linear_and_conv_weight_maps_to_one_initializer(exported):
    model, path = exported
    wm = wo.build_weight_map(path, model.unet)
    wanted = {n for n, p in model.unet.named_parameters() if p.ndim in (2, 4)}
    assert set(wm) == wanted
    assert len({v[0] for v in wm.values()}) == len(wm)  # no two parameters share an initializer
    assert any(t for _, t in wm.values()) and any(not t for _, t in wm.values())  # Linear weights are stored transposed


def test_onnxruntime_and_openvino_run_the_new_weights(exported):
    import onnxruntime as ort
    import openvino as ov

    model, path = exported
    wm = wo.build_weight_map(path, model.unet)
    unet, changed = _edited(model)
    feeds = _inputs(model)
    with torch.no_grad():
        want = unet(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "context"))).numpy()
        old = model.unet(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "context"))).numpy()
    assert np.abs(want - old).max() > 0.05  # the edit matters
    arrays = wo.replacement_arrays(wm, changed)

    from ldm_engine.backends.onnxruntime_backend import session_options

    so = session_options()  # works beside a backend's process-wide thread pool
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # lowered by add_to_session_options
    keep = wo.add_to_session_options(so, arrays)
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-4
    del keep

    core = ov.Core()
    ov_model = core.read_model(str(path))
    assert wo.replace_constants(ov_model, arrays) == len(arrays)
    got = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feeds)[0]
    assert np.abs(got - want).max() < 1e-4


def test_a_tensor_the_graph_does_not_hold_is_refused(exported):
    model, path = exported
    wm = wo.build_weight_map(path, model.unet)
    with pytest.raises(KeyError, match="export it again"):
        wo.replacement_arrays(wm, {"out.0.weight": torch.ones(32)})
    with pytest.raises(KeyError, match="not constants"):
        import openvino as ov

        wo.replace_constants(ov.Core().read_model(str(path)), {"no-such-initializer": np.zeros(3, np.float32)})
