"""The exported ONNX graphs run by OpenVINO on the CPU: bf16 inference precision where the CPU has
bf16 instructions (AVX512_BF16 / AMX), f32 otherwise or on request; each graph is reshaped to the
static shape of the call and compiled for it (OpenVINO's fastest mode on CPUs)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .graph_backend import GraphBackend, physical_cores

RESHAPE_MODES = ("auto", "fixed", "dynamic")
INT8_COMPONENTS = ("unet", "text_encoder", "vae_decoder", "vae_encoder")  # the graphs dtype="int8" quantizes
_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _ov():
    try:
        import openvino
    except ImportError:
        raise RuntimeError("backend='openvino' needs OpenVINO: pip install 'ldm_engine[openvino]'") from None
    return openvino


def cpu_supports_bf16(core) -> bool:
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def is_int8(dtype) -> bool:
    """dtype="int8" (or torch.int8): the NNCF-quantized graphs (ldm_engine.optimize.int8)."""
    return dtype == "int8" or dtype is torch.int8


def inference_precision(dtype: torch.dtype | None, bf16_ok: bool) -> str:
    """dtype None: bf16 where the CPU supports it, else f32; an explicit dtype is honoured or refused."""
    if dtype is None:
        return "bf16" if bf16_ok else "f32"
    if dtype not in _PRECISIONS:
        raise ValueError(f"backend='openvino' runs float32, bfloat16, float16 or 'int8', got dtype={dtype}")
    if dtype == torch.bfloat16 and not bf16_ok:
        raise ValueError("this CPU has no bf16 instructions (AVX512_BF16 or AMX): use dtype=torch.float32")
    return _PRECISIONS[dtype]


class OpenVINOBackend(GraphBackend):
    """`reshape`: 'auto' compiles a static graph per input shape (kept for the last few shapes);
    'fixed' compiles for the first shape and refuses others with an error; 'dynamic' compiles once
    with dynamic shapes (slower per call, no recompiles).
    dtype="int8": the UNet quantized W8A8 and the text encoder and VAE weight-compressed with NNCF
    (ldm_engine.optimize.int8), made once into the artifact cache; what stays floating point runs in
    bf16 where the CPU has it, else f32."""

    name = "openvino"
    KEEP_SHAPES = 4  # compiled shapes kept per component

    def __init__(self, model, device="cpu", dtype: torch.dtype | None = None, reshape: str = "auto",
                 threads: int | None = None, onnx_dir=None, cache_dir=None,
                 progress: bool = True):
        if torch.device(device).type != "cpu":
            raise ValueError(f"backend='openvino' runs on the CPU here, got device={device!r}")
        if reshape not in RESHAPE_MODES:
            raise ValueError(f"reshape must be one of {', '.join(RESHAPE_MODES)}, got {reshape!r}")
        super().__init__(model, device, onnx_dir, cache_dir, progress)
        ov = _ov()
        self.ov = ov
        self.core = ov.Core()
        self.int8 = is_int8(dtype)
        if self.int8:
            if self.onnx_dir is not None:
                raise ValueError("dtype='int8' quantizes the graphs of the artifact cache; leave onnx_dir unset")
            from ..optimize.int8 import require_nncf

            require_nncf()
        self.precision = inference_precision(None if self.int8 else dtype, cpu_supports_bf16(self.core))
        self.dtype = torch.int8 if self.int8 else {v: k for k, v in _PRECISIONS.items()}[self.precision]
        self.reshape = reshape
        self.threads = threads or physical_cores()
        self.config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": self.threads}
        # OpenVINO's CACHE_DIR (compiled blobs on disk) is left off: blobs it reloaded for these graphs after a
        # static reshape gave NaN outputs where a fresh compile of the same graph was correct
        self._models: dict[str, object] = {}
        self._embed_outside: dict[str, int] = {}  # graph key -> width of the timestep embedding it takes as input
        self._compiled: dict[str, OrderedDict] = {}

    def _read(self, component: str):
        if component not in self._models:
            from ..export.weight_overrides import replace_constants

            path, arrays = self.graph_source(component)
            if self.int8 and component in INT8_COMPONENTS:
                from ..optimize.int8 import int8_model

                model = int8_model(self.core, path, component, path.parent.name, self.model, self._cache,
                                   self.progress)
            else:
                model = self.core.read_model(str(path))
            if arrays:  # tensors changed since the graph was exported (LoRA): swapped in, no new export
                replace_constants(model, arrays)
            if self.precision != "f32" and _takes_timestep(component):
                model = self._embedding_as_input(model, component)
            self._models[component] = model
        return self._models[component]

    def _embedding_as_input(self, model, component: str):
        """Cut the sinusoidal timestep embedding out of the UNet graph (and a ControlNet's, which has the
        same time embedding); it is fed in, computed in f32.
        Under a bf16 precision hint OpenVINO rounds t * freq to 8 significant bits before cos/sin (at
        t = 999 the phase is off by up to 2 radians), which alone made the tiny UNets' output differ
        by 0.06 from torch; the rest of the graph in bf16 differs by less than 0.001."""
        ov = self.ov
        timestep = next(p for p in model.get_parameters() if p.get_friendly_name() == "timestep")
        todo, concat = [timestep], None
        while todo and concat is None:
            node = todo.pop(0)
            for out in node.outputs():
                for target in out.get_target_inputs():
                    user = target.get_node()
                    kinds = {i.get_source_output().get_node().get_type_name() for i in user.inputs()}
                    if user.get_type_name() == "Concat" and kinds == {"Cos", "Sin"}:
                        concat = user
                    todo.append(user)
        if concat is None:  # not the layout this package exports: leave the graph as it is
            return model
        shape = concat.output(0).get_partial_shape()
        embedding = ov.opset13.parameter(shape, ov.Type.f32, name="timestep_embedding")
        for target in list(concat.output(0).get_target_inputs()):
            target.replace_source_output(embedding.output(0))
        params = [p for p in model.get_parameters() if p.get_friendly_name() != "timestep"] + [embedding]
        self._embed_outside[component] = shape[shape.rank.get_length() - 1].get_length()
        return ov.Model(model.get_results(), params, model.get_friendly_name())

    def check_weights_changeable(self, components) -> None:
        if self.int8:
            raise ValueError(f"dtype='int8' graphs are quantized for the weights they were made from, so the model's "
                             f"{' and '.join(components)} weights cannot change (LoRA); use "
                             "dtype=torch.float32 or bfloat16 for them")
        super().check_weights_changeable(components)

    def compiled(self, component: str, shapes: dict[str, tuple]):
        """The compiled graph for these input shapes (compiling it on first use)."""
        known = self._compiled.setdefault(component, OrderedDict())
        key = "dynamic" if self.reshape == "dynamic" else tuple(sorted(shapes.items()))
        if key in known:
            known.move_to_end(key)
            return known[key]
        if self.reshape == "fixed" and known:
            (have,) = known
            raise ValueError(f"the OpenVINO {component} graph was compiled for {dict(have)}, and this call has "
                             f"{shapes}; make the backend with reshape='auto' to recompile for new sizes")
        model = self._read(component)
        if key != "dynamic":
            model = model.clone()
            model.reshape({name: self.ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        config = dict(self.config)
        if component.startswith("text_encoder") or (component == "vae_decoder" and self.model.config.vae.kind == "vq"):
            # These run once per generation and decide a lot: the text encoder's output conditions every
            # step, and a VQ decoder snaps latents to the nearest codebook entry, which bf16 distances
            # get wrong (tiny VQ model: 27.8 dB against torch in bf16). Kept f32.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = self.core.compile_model(model, "CPU", config)
        known[key] = (compiled, compiled.create_infer_request())
        while len(known) > self.KEEP_SHAPES:
            known.popitem(last=False)
        return known[key]

    def _loaded_keys(self) -> list[str]:
        return list(set(self._models) | set(self._compiled))

    def _forget(self, key: str) -> None:
        self._models.pop(key, None)
        self._compiled.pop(key, None)
        self._embed_outside.pop(key, None)

    def _run_all(self, component: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if _takes_timestep(component):
            self._read(component)
            if component in self._embed_outside:
                from ..models.unet import timestep_embedding

                t = torch.tensor(feeds.pop("timestep"))  # a copy: the feed may be a read-only broadcast view
                feeds["timestep_embedding"] = timestep_embedding(t, self._embed_outside[component]).numpy()
        # the static reshape covers every input: latents, context, and a ControlNet's hint and residuals
        compiled, request = self.compiled(component, {k: v.shape for k, v in feeds.items()})
        request.infer(feeds, share_inputs=True)
        # the request's buffers are reused by the next call: copies out
        return [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]


def _takes_timestep(key: str) -> bool:
    """The graphs with a sinusoidal timestep embedding: the UNet's (and its step-cache halves) and the ControlNets'."""
    from ..export.step_cache_graphs import parse_cache_component

    return key in ("unet", "unet_control") or key.startswith("controlnet#") or parse_cache_component(key) is not None
