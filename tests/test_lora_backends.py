"""LoRAs on the graph backends: a LoRA change misses the artifact cache (new graphs, exported from the
merged weights), an unload finds the original graphs again (no export); images >= 40 dB against torch
with the same LoRA. TensorRT refits: the plan (which engine weights change) and the refit calls, with a
stand-in for the GPU runtime."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

from test_lora_keys import save_tensors  # noqa: E402

from ldm_engine import Pipeline  # noqa: E402
from ldm_engine.bench import psnr  # noqa: E402
from ldm_engine.export.trt_engines import EngineError  # noqa: E402
from ldm_engine.loading import random_model  # noqa: E402

Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v"
CONV = "lora_unet_output_blocks_0_0_in_layers_2"  # (64, 128, 3, 3)
TE = "lora_te_text_model_encoder_layers_1_mlp_fc1"  # (64, 32)
KW = dict(prompt=["a red circle"], height=16, width=16, num_inference_steps=3, guidance_scale=5.0, seed=2,
          output_type="np", progress=False)


def lora_file(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, down, up in ((Q, (4, 32), (32, 4)), (CONV, (4, 128, 3, 3), (64, 4, 1, 1)), (TE, (4, 32), (64, 4))):
        sd |= {f"{name}.lora_down.weight": torch.randn(*down, generator=g),
               f"{name}.lora_up.weight": torch.randn(*up, generator=g)}
    return save_tensors(path, sd)


@pytest.fixture()
def exports(monkeypatch):
    from ldm_engine.export import artifacts

    calls = []
    real = artifacts.export_component
    monkeypatch.setattr(artifacts, "export_component", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_follow_a_lora_and_find_the_original_again(backend, tmp_path, exports):
    pytest.importorskip(backend)
    path = lora_file(tmp_path / "style.safetensors")
    ref = Pipeline(random_model("tiny-sd1", seed=11))
    ref.load_lora(path, 0.9)
    expected = ref(**KW).images
    pipe = Pipeline(random_model("tiny-sd1", seed=11), backend, dtype=torch.float32, progress=False,
                    cache_dir=tmp_path / "cache")
    plain = pipe(**KW).images
    assert sorted(exports) == ["text_encoder", "unet", "vae_decoder"]
    exports.clear()
    pipe.load_lora(path, 0.9)
    got = pipe(**KW).images
    # the UNet keeps its original graph with the changed tensors swapped in; the small text encoder re-exports
    assert exports == ["text_encoder"]
    assert psnr(expected, got) >= 40.0 and psnr(plain, got) < 30.0
    exports.clear()
    pipe.unload_loras()
    again = pipe(**KW).images
    assert exports == []  # the original weights hash to the original graphs: no export
    np.testing.assert_array_equal(again, plain)


def test_prompt_tags_on_a_graph_backend_reuse_their_graphs(tmp_path, exports):
    pytest.importorskip("onnxruntime")
    lora_file(tmp_path / "style.safetensors")
    pipe = Pipeline(random_model("tiny-sd1", seed=11), "onnxruntime", progress=False, lora_dirs=[tmp_path],
                    cache_dir=tmp_path / "cache")
    first = pipe(**{**KW, "prompt": ["a red circle <lora:style:0.9>"]}).images
    exports.clear()
    second = pipe(**{**KW, "prompt": ["a red circle <lora:style:0.9>"]}).images
    assert exports == []  # merged and restored weights both hash to graphs already exported
    np.testing.assert_array_equal(first, second)


# ---- TensorRT: refit plan and refit calls, no GPU needed -----------------------------------------------


@pytest.fixture(scope="module")
def unet_graphs(tmp_path_factory):
    """The tiny UNet exported before and after a LoRA (and the text encoder graph, another structure)."""
    from ldm_engine.backends.tensorrt_refit import graph_weights
    from ldm_engine.export.artifacts import onnx_artifact
    from ldm_engine.export.cache import ArtifactCache

    d = tmp_path_factory.mktemp("refit")
    cache = ArtifactCache(d / "cache")
    pipe = Pipeline(random_model("tiny-sd1", seed=12))
    before = onnx_artifact(pipe.model, "unet", cache=cache, progress=False)
    pipe.load_lora(lora_file(d / "l.safetensors"), 0.5)
    after = onnx_artifact(pipe.model, "unet", cache=cache, progress=False)
    text = onnx_artifact(pipe.model, "text_encoder", cache=cache, progress=False)
    return graph_weights(before), graph_weights(after), graph_weights(text)


def test_refit_plan_lists_exactly_the_changed_weights(unet_graphs):
    from ldm_engine.backends.tensorrt_refit import refit_plan

    before, after, text = unet_graphs
    plan = refit_plan(before, after)
    assert len(plan.changed) == 2 and plan.unchanged == len(after.weights) - 2  # attn2.to_v and the conv
    assert any("in_layers.2" in n for n in plan.changed)
    assert refit_plan(before, before).empty
    full = refit_plan(None, after)  # engine_dir engines: the graph they were built from is unknown
    assert not full.exact and set(plan.changed) <= set(full.changed)
    with pytest.raises(EngineError, match="another structure"):
        refit_plan(before, text)
    name = plan.changed[0]
    dtype, shape, digest = after.weights[name]
    reshaped = type(after)(after.path, after.structure, {**after.weights, name: (dtype, shape + (1,), digest)})
    with pytest.raises(EngineError, match="a refit keeps shapes and types: the engine must be rebuilt"):
        refit_plan(before, reshaped)


class _FakeTRT:
    """The tensorrt API a refit touches, recording what it is given."""

    def __init__(self, engine_weights, missing=(), ok=True):
        outer = self
        self.set, self.refitted = {}, False
        self.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", BF16="BF16", INT32="INT32", INT64="INT64",
                                              INT8="INT8", BOOL="BOOL")

        class Weights:
            def __init__(self, dtype, ptr, count):
                self.dtype, self.count = dtype, count

        class Refitter:
            def __init__(self, engine, logger):
                pass

            def get_all_weights(self):
                return list(engine_weights)

            def set_named_weights(self, name, w):
                outer.set[name] = (w.dtype, w.count)
                return True

            def get_missing_weights(self):
                return list(missing)

            def refit_cuda_engine(self):
                outer.refitted = True
                return ok

        self.Weights, self.Refitter = Weights, Refitter


def test_refit_engine_sets_the_planned_weights(unet_graphs):
    from ldm_engine.backends.tensorrt_refit import refit_engine, refit_plan

    before, after, _ = unet_graphs
    plan = refit_plan(before, after)
    extra = next(n for n, (t, _, _) in after.weights.items() if t == 1 and n not in plan.changed)
    trt = _FakeTRT(list(after.weights), missing=[extra])
    assert refit_engine(trt, object(), after.path, plan, None) == 3
    assert trt.refitted and set(trt.set) == set(plan.changed) | {extra}
    name = plan.changed[0]
    assert trt.set[name] == ("FLOAT", int(np.prod(after.weights[name][1])))
    with pytest.raises(EngineError, match="cannot refit"):
        refit_engine(_FakeTRT([extra]), object(), after.path, plan, None)
    with pytest.raises(EngineError, match="could not refit"):
        refit_engine(_FakeTRT(list(after.weights), ok=False), object(), after.path, plan, None)
    assert refit_engine(_FakeTRT([]), object(), after.path, refit_plan(after, after), None) == 0


def test_engine_dir_engines_must_be_refittable(tmp_path):
    from ldm_engine.backends.tensorrt_backend import TensorRTBackend

    backend = object.__new__(TensorRTBackend)  # the pure check needs no GPU, so no constructor
    backend.engine_dir = tmp_path
    (tmp_path / "unet.json").write_text(json.dumps({"refit": True}))
    (tmp_path / "text_encoder.json").write_text(json.dumps({"refit": False}))
    backend.check_weights_changeable(["unet"])
    with pytest.raises(ValueError, match=r"built without --refit.*text_encoder.*--refit"):
        backend.check_weights_changeable(["unet", "text_encoder"])
    backend.engine_dir = None
    backend.check_weights_changeable(["text_encoder"])  # cached engines are rebuilt (or refitted)
