"""Long prompts, clip skip and textual-inversion embeddings on the graph backends: a 2-chunk weighted
prompt through ONNX Runtime and OpenVINO against torch (image PSNR >= 40 dB), the text encoder graph
per output layer, the graph after loading and unloading an embedding, and the TensorRT parts that need
no GPU."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

pytest.importorskip("onnx")

from ldm_engine.bench import psnr  # noqa: E402
from ldm_engine.pipeline import Pipeline  # noqa: E402

LONG = ", ".join(["a painting of a fox in the snow"] * 10) + ", (red circle:1.3), [blue]"  # 100 tokens


def _needs(backend):
    pytest.importorskip("onnxruntime" if backend == "onnxruntime" else "openvino")


def _model(tiny_sd1):
    """tiny-sd1 (its UNet and VAE graphs are shared with the other graph tests) with a text encoder of
    its own whose final LayerNorm has a bias: random-init CLIP has none, which leaves the emphasis
    rescale mean(z) / mean(z·w) a ratio of rounding errors."""
    text_encoder = copy.deepcopy(tiny_sd1.text_encoder)
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    return dataclasses.replace(tiny_sd1, text_encoder=text_encoder)


@pytest.fixture(scope="module")
def model(tiny_sd1):
    return _model(tiny_sd1)


@pytest.fixture(scope="module")
def torch_pipe(model):
    return Pipeline(model, "torch")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_two_chunk_prompts_and_clip_skip_match_torch(model, torch_pipe, backend):
    _needs(backend)
    pipe = Pipeline(model, backend, dtype=torch.float32, progress=False)
    assert len(torch_pipe.prompts.chunks(LONG)) == 2
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=16, width=16, seed=3, output_type="np", progress=False)
    ref = torch_pipe(LONG, negative_prompt="blurry", **kw).images
    out = pipe(LONG, negative_prompt="blurry", **kw).images  # context (2, 154, 32) through the UNet graph
    assert psnr(ref, out) >= 40
    expected = torch_pipe.encode_prompt(LONG, clip_skip=2)[0]  # the text encoder graph ending a layer earlier
    assert (pipe.encode_prompt(LONG, clip_skip=2)[0] - expected).abs().max() <= 1e-4


def test_each_output_layer_is_its_own_cached_graph(model):
    pytest.importorskip("onnxruntime")
    from ldm_engine.export.artifacts import onnx_key

    pipe = Pipeline(model, "onnxruntime", progress=False)
    own = pipe.backend.graph_path("text_encoder")
    assert pipe.backend.graph_path("text_encoder@-1") == own  # the model's own layer: the same graph
    skip = pipe.backend.graph_path("text_encoder@-2")
    assert skip != own and onnx_key(model, "text_encoder", output_layer=-2) in str(skip)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(skip), load_external_data=False).metadata_props}
    assert meta["ldm_engine.output_layer"] == "-2"
    unet = onnx.load(str(pipe.backend.graph_path("unet")), load_external_data=False)
    context = next(i for i in unet.graph.input if i.name == "context")
    assert context.type.tensor_type.shape.dim[1].dim_param == "tokens"  # any number of 77-token chunks


def test_an_embedding_changes_the_graph_and_unloading_finds_the_original(tiny_sd1, model, tmp_path):
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))},
              tmp_path / "mystyle.safetensors")
    pipe = Pipeline(model, "onnxruntime", progress=False)
    prompt = "a (mystyle:1.2) fox, " + LONG  # in a weighted part, in a 2-chunk prompt
    original_graph = pipe.backend.graph_path("text_encoder")
    before = pipe.encode_prompt(prompt, "mystyle")
    pipe.load_textual_inversion(tmp_path / "mystyle.safetensors")
    assert pipe.backend.graph_path("text_encoder") != original_graph  # the enlarged table: a new export
    with_embedding = pipe.encode_prompt(prompt, "mystyle")
    assert (with_embedding[0] - before[0]).abs().max() > 1e-2
    reference = Pipeline(_model(tiny_sd1), "torch")
    reference.load_textual_inversion(tmp_path / "mystyle.safetensors")
    expected = reference.encode_prompt(prompt, "mystyle")
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(with_embedding, expected))
    pipe.unload_textual_inversions()
    assert pipe.backend.graph_path("text_encoder") == original_graph
    after = pipe.encode_prompt(prompt, "mystyle")
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_fixed_graphs_refuse_what_they_cannot_follow(tiny_sd1, tmp_path):
    pytest.importorskip("onnxruntime")
    import shutil

    from safetensors.torch import save_file

    from ldm_engine.export.artifacts import onnx_artifact

    (tmp_path / "graphs").mkdir()
    shutil.copy(onnx_artifact(tiny_sd1, "text_encoder", progress=False), tmp_path / "graphs" / "text_encoder.onnx")
    pipe = Pipeline(tiny_sd1, "onnxruntime", onnx_dir=tmp_path / "graphs", progress=False)
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "mystyle.safetensors")
    table = tiny_sd1.text_encoder.embeddings.token_embedding
    original = table.weight
    with pytest.raises(ValueError, match="graphs in onnx_dir .* are fixed"):
        pipe.load_textual_inversion(tmp_path / "mystyle.safetensors")
    assert table.weight is original and pipe.textual_inversions == {}  # put back as it was
    with pytest.raises(ValueError, match="clip skip needs a text encoder graph ending at layer -2"):
        pipe.encode_prompt("x", clip_skip=2)


def test_tensorrt_engine_folders_hold_the_own_layer_only(tmp_path):
    from ldm_engine.backends.tensorrt_backend import engine_dir_path

    assert engine_dir_path(tmp_path, "text_encoder", ".plan") == tmp_path / "text_encoder.plan"
    with pytest.raises(ValueError, match="engine ending at layer -2"):
        engine_dir_path(tmp_path, "text_encoder@-2", ".plan")


def test_tensorrt_profiles_cover_prompts_of_1_to_3_chunks(tiny_sd1, tmp_path):
    from ldm_engine.export.artifacts import onnx_artifact
    from ldm_engine.export.graphs import Shape
    from ldm_engine.export.trt_engines import MAX_PROMPT_CHUNKS, fits_profile, profile_for, read_graph

    lo, opt, hi = Shape(16, 16, 1), Shape(32, 32, 1), Shape(32, 32, 2)
    unet = profile_for(read_graph(onnx_artifact(tiny_sd1, "unet", progress=False)), lo, opt, hi)
    assert MAX_PROMPT_CHUNKS == 3 and [s[1] for s in unet["context"]] == [77, 77, 231]
    text = profile_for(read_graph(onnx_artifact(tiny_sd1, "text_encoder", progress=False)), lo, opt, hi)
    assert text["input_ids"][2] == (2 * 2 * 3, 77)  # CFG pair x images x chunks, one row per chunk
    record = {"profile": {k: [list(s) for s in v] for k, v in unet.items()}}
    two_chunks = {"sample": (4, 4, 16, 16), "timestep": (4,), "context": (4, 154, 32)}
    assert fits_profile(record, two_chunks)
    assert not fits_profile(record, {**two_chunks, "context": (4, 308, 32)})
