"""TensorRT engines on a CUDA GPU, the UNet step replayed as a CUDA graph per input shape.

Engines come from `engine_dir` (built by `python export/build_trt.py`) or, without one, are built on
first use into the artifact cache (ONNX export, then a dynamic profile around the model's native
size). Every engine's side file is checked against this TensorRT and GPU before it is used.

ControlNets run as two engines, as on the ONNX-graph backends: each ControlNet's own (`controlnet`, the
residuals at scale 1) and the UNet taking them (`unet_control`); engine_dir holds them as
controlnet_<name>.plan (the pipeline's name for the ControlNet, its weights checked) and unet_control.plan.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch

from ..models.autoencoder import DiagonalGaussian, Deterministic
from .graph_backend import graph_key, split_graph_key

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32}


def _require():
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("backend='tensorrt' needs TensorRT and an NVIDIA GPU: pip install 'ldm_engine[tensorrt]'"
                           ) from None
    if not torch.cuda.is_available():
        raise RuntimeError("backend='tensorrt' needs a CUDA device, and none is visible")
    return trt


def default_profile(model):
    """(min, opt, max) image shapes for engines built on first use: 8 latent pixels up to twice the
    native size (at least 1024 px), 1 to 4 images, tuned at the native size."""
    from ..export.graphs import Shape

    f = model.config.vae.downsampling_factor
    native = model.config.image_size
    top = max(1024, 2 * native)
    return Shape(8 * f, 8 * f, 1), Shape(native, native, 1), Shape(top, top, 4)


def engine_cache_key(graph_key: str, trt_version: str, gpu: str, precision: str, refit: bool) -> str:
    """The artifact cache key of an engine built on first use: its ONNX graph's key (component, weights hash:
    the UNet's, or a ControlNet's own, shape profile, dtype, exporter) + TensorRT version, GPU and precision."""
    from ..export.artifacts import safe_part

    return f"{graph_key}-trt{trt_version}-{safe_part(gpu)}-{precision}" + ("-refit" if refit else "")


def weights_of(key: str) -> str | None:
    """The model component whose weights an engine carries (None for a ControlNet's own engine)."""
    component = split_graph_key(key)[0]
    return "unet" if component == "unet_control" else None if component.startswith("controlnet#") else component


def engine_dir_path(engine_dir: Path, key: str, suffix: str) -> Path:
    """The engine file for a graph key in a folder written by build_trt.py, which holds each
    component's engine for the model's own text encoder layer only."""
    component, layer = split_graph_key(key)
    if layer is not None:
        raise ValueError(f"clip skip needs a text encoder engine ending at layer {layer}, and engine_dir {engine_dir} "
                         "holds the model's own one only; leave engine_dir unset (engines then build into the "
                         "artifact cache) or use the model's own layer")
    return Path(engine_dir) / f"{component}{suffix}"


class _Engine:
    """One deserialized engine and its execution context."""

    def __init__(self, trt, path: Path, record: dict, logger):
        self.record = record
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path}; rebuild it with python export/build_trt.py")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def run(self, feeds: dict[str, torch.Tensor], stream) -> torch.Tensor:
        return self.run_all(feeds, stream)[self.outputs[0]]

    def run_all(self, feeds: dict[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        """Every output by name (a ControlNet engine has one per residual)."""
        from ..export.trt_engines import fits_profile

        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        if not fits_profile(self.record, shapes):
            raise ValueError(f"{self.record['component']}: shapes {shapes} are outside the engine's profile "
                             f"{self.record['profile']}; rebuild with python export/build_trt.py --min/--max")
        for name in self.inputs:
            self.context.set_input_shape(name, shapes[name])
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        outs = {}
        for name in self.outputs:
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                     device=feeds[self.inputs[0]].device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.record['component']}")
        return outs


class TensorRTBackend:
    name = "tensorrt"
    graph_capturable = True  # enqueues on the current stream: the pipeline's CUDA graph can record it
    accepts_control = True  # controlnet() runs a ControlNet's engine; denoise takes its residuals

    def __init__(self, model, device="cuda", dtype: torch.dtype | None = None, engine_dir=None,
                 cuda_graph: bool = True, cache_dir=None, refit: bool = False):
        """`refit`: build the engines made on first use refittable, so a LoRA change refits their weights
        instead of building new engines (engine_dir engines are refitted when built with --refit)."""
        trt = _require()
        self.trt = trt
        self.model = model
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"backend='tensorrt' runs on a CUDA device, got device={device!r}")
        self.dtype = dtype or torch.float16
        from ..export.graphs import DTYPE_NAMES

        self.precision = DTYPE_NAMES[self.dtype]
        self.engine_dir = Path(engine_dir) if engine_dir else None
        self.cache_dir = cache_dir
        self.cuda_graph = cuda_graph
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.gpu = torch.cuda.get_device_name(self.device)
        self._engines: dict[str, _Engine] = {}
        self._graphs: dict[tuple, tuple] = {}  # UNet input shapes -> (graph, static inputs, static output)
        self.refit = refit
        self._graph_of: dict[str, Path] = {}  # graph key -> the ONNX graph its engine's weights come from
        self._changed: set[str] = set()  # components whose weights differ from engine_dir's engines
        self._control_nets: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # graph key -> ControlNet
        self._control_files: dict[str, Path] = {}  # graph key -> its engine in engine_dir

    # ---- engines ---------------------------------------------------------------------------------

    def _engine_path(self, key: str) -> Path:
        """`key`: a component, or a graph key (the text encoder for another output layer)."""
        from ..export.trt_engines import ENGINE_SUFFIX

        if self.engine_dir is not None:
            if key.startswith("controlnet#"):
                return self._control_files[key]  # found and checked by prepare_controlnet
            return engine_dir_path(self.engine_dir, key, ENGINE_SUFFIX)
        return self._build_cached(key)

    def _build_cached(self, graph: str) -> Path:
        """Export the graph and build its engine into the artifact cache (first use only)."""
        from ..export.artifacts import controlnet_artifact, controlnet_key, onnx_artifact, onnx_key
        from ..export.cache import ArtifactCache
        from ..export.trt_engines import ENGINE_SUFFIX, build_engine, profile_for, read_graph

        component, layer = split_graph_key(graph)
        cache = ArtifactCache(self.cache_dir)
        major = int(self.trt.__version__.split(".")[0])
        graph_dtype = self.precision if major >= 11 else "fp32"  # strongly typed: precision lives in the graph
        if component.startswith("controlnet#"):  # keyed by the ControlNet's own weights
            net = self._control_nets[component]
            onnx_path = controlnet_artifact(self.model, net, graph_dtype, None, cache)
            graph_key_ = controlnet_key(self.model, net, graph_dtype, None)
            component = "controlnet"
        else:
            onnx_path = onnx_artifact(self.model, component, graph_dtype, None, cache, output_layer=layer)
            graph_key_ = onnx_key(self.model, component, graph_dtype, None, layer)
        info = read_graph(onnx_path)
        profile = profile_for(info, *default_profile(self.model))
        key = engine_cache_key(graph_key_, self.trt.__version__, self.gpu, self.precision, self.refit)
        self._graph_of[graph] = onnx_path

        def build(folder: Path) -> dict:
            return build_engine(onnx_path, folder / f"{component}{ENGINE_SUFFIX}", profile, self.precision, info,
                                refit=self.refit)

        return cache.get_or_build("tensorrt", key, build) / f"{component}{ENGINE_SUFFIX}"

    def engine(self, component: str) -> _Engine:
        from ..export.trt_engines import check_record

        if component not in self._engines:
            path = self._engine_path(component)
            record = check_record(path, self.trt.__version__, self.gpu)
            self._engines[component] = _Engine(self.trt, path, record, self.logger)
            if self.engine_dir is not None and weights_of(component) in self._changed:
                self._refit(component, self._engines[component])  # the folder's engine has the old weights
        return self._engines[component]

    def _current_graph(self, key: str) -> Path:
        """The ONNX graph of the model's current weights (exported into the artifact cache when new)."""
        from ..export.artifacts import onnx_artifact
        from ..export.cache import ArtifactCache

        component, layer = split_graph_key(key)
        graph_dtype = self.precision if int(self.trt.__version__.split(".")[0]) >= 11 else "fp32"
        return onnx_artifact(self.model, component, graph_dtype, None, ArtifactCache(self.cache_dir),
                             output_layer=layer)

    def _refit(self, key: str, eng: _Engine) -> bool:
        """New weights into a refittable engine; False when it is not refittable or the graphs differ."""
        from ..export.trt_engines import EngineError
        from .tensorrt_refit import graph_weights, refit_engine, refit_plan

        if not eng.record.get("refit"):
            return False
        new = self._current_graph(key)
        old = self._graph_of.get(key)
        try:
            plan = refit_plan(graph_weights(old) if old else None, graph_weights(new))
            refit_engine(self.trt, eng.engine, new, plan, self.logger)
        except EngineError:
            if self.engine_dir is not None:
                raise
            return False
        self._graph_of[key] = new
        return True

    def _run(self, component: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        eng = self.engine(component)
        feeds = {k: v.to(self.device, eng.dtypes[k]).contiguous() for k, v in feeds.items()}
        return eng.run(feeds, torch.cuda.current_stream(self.device)).float()

    # ---- ControlNets -----------------------------------------------------------------------------

    def prepare_controlnet(self, net: torch.nn.Module, name: str | None = None) -> None:
        """Keep ControlNet `net` where its graph is exported from (float32 on the CPU, as the UNet); with
        engine_dir, its engine is the one build_trt.py --controlnet made there for `name` (the pipeline's
        name for it), refused when built for other weights."""
        from ..export.control_graphs import controlnet_weights_hash
        from ..export.trt_engines import check_control_engine

        net.to("cpu", torch.float32)
        weights = controlnet_weights_hash(net)
        path = check_control_engine(self.engine_dir, name, weights) if self.engine_dir is not None else None
        key = f"controlnet#{weights}"
        self._control_nets[key] = net
        if path is not None:
            self._control_files[key] = path

    @torch.no_grad()
    def controlnet(self, net: torch.nn.Module, x: torch.Tensor, t, context: torch.Tensor, hint: torch.Tensor,
                   extra: dict | None = None) -> list[torch.Tensor]:
        """ControlNet `net`'s residuals at scale 1 (one per UNet input block, then the middle block's), run by
        its engine: the CFG batch, or the conditional half alone in guess mode."""
        from ..export.control_graphs import controlnet_weights_hash, residual_layout

        extra = extra or {}
        key = f"controlnet#{controlnet_weights_hash(net)}"
        self._control_nets.setdefault(key, net)
        feeds = control_feeds(net.control_config.unet, x, t, context, hint, extra, self.device)
        eng = self.engine(key)
        feeds = {k: v.to(self.device, eng.dtypes[k]).contiguous() for k, v in feeds.items()}
        outs = eng.run_all(feeds, torch.cuda.current_stream(self.device))
        return [outs[name].float() for name, _, _ in residual_layout(net.control_config.unet)]

    # ---- the backend interface -------------------------------------------------------------------

    def check_weights_changeable(self, components) -> None:
        """Raise before the model's weights change when engine_dir holds engines that cannot follow
        (built without --refit)."""
        if self.engine_dir is None:
            return
        import json

        from ..export.trt_engines import ENGINE_SUFFIX, side_file

        for component in components:
            engines = [component]
            if component == "unet" and (self.engine_dir / f"unet_control{ENGINE_SUFFIX}").is_file():
                engines.append("unet_control")  # the UNet taking ControlNet residuals carries the same weights
            for engine in engines:
                try:
                    refittable = bool(json.loads(side_file(self.engine_dir / f"{engine}{ENGINE_SUFFIX}").read_text())
                                      .get("refit"))
                except (OSError, ValueError):
                    refittable = False
                if not refittable:
                    raise ValueError(f"the engines in engine_dir {self.engine_dir} are fixed ({engine} built without "
                                     f"--refit), so the model's {component} weights cannot change (textual "
                                     "inversion, LoRA); rebuild them with python export/build_trt.py --refit, or leave "
                                     "engine_dir unset: engines then build into the artifact cache from the model as "
                                     "it is")

    def reload(self, component: str) -> None:
        """Bring the engines of `component` in line with the model's current weights: refittable engines
        get the new weights in place; the others are dropped (with the UNet's captured CUDA graphs) and
        built again on the next call (the cache key hashes the weights)."""
        self.check_weights_changeable([component])
        if self.engine_dir is not None:
            self._changed.add(component)
        for key in [k for k in self._engines if weights_of(k) == component]:
            if not self._refit(key, self._engines[key]):
                del self._engines[key]
        if component == "unet":  # the UNet's captured CUDA graphs (with and without residuals)
            self._graphs.clear()

    @torch.no_grad()
    def encode_text(self, ids, output_layer: int | None = None):
        """`output_layer` None: the text encoder's own; another layer (clip skip) has an engine of its own."""
        key = graph_key("text_encoder", output_layer, self.model.text_encoder.config.output_layer)
        return self._run(key, {"input_ids": ids.long()})

    @torch.no_grad()
    def embed_class(self, labels):
        return self.model.class_embedder.to(self.device)(labels.to(self.device)).float()

    @torch.no_grad()
    def denoise(self, z, t, context, extra=None):
        extra = extra or {}
        feeds = {"sample": z, "timestep": torch.as_tensor(t, dtype=torch.float32, device=self.device).expand(z.shape[0])}
        if context is not None:
            feeds["context"] = context
        if extra.get("class_labels") is not None:
            feeds["class_labels"] = extra["class_labels"].long()
        if (dim := self.model.config.unet.time_cond_proj_dim) is not None:  # LCM-distilled: the guidance embedding
            cond = extra.get("timestep_cond")
            feeds["timestep_cond"] = torch.zeros(z.shape[0], dim, device=self.device) if cond is None else cond
        component = "unet"
        if extra.get("control") is not None:  # ControlNet residuals: the UNet engine that adds them
            feeds |= residual_feeds(self.model.config.unet, extra["control"], z)
            component = "unet_control"
        # inside the pipeline's own CUDA-graph capture (denoiser + update as one graph) run plainly
        if self.cuda_graph and not torch.cuda.is_current_stream_capturing():
            return self._graph_step(feeds, component)
        return self._run(component, feeds)

    def _graph_step(self, feeds: dict[str, torch.Tensor], component: str = "unet") -> torch.Tensor:
        """Replay the UNet for these shapes from a CUDA graph (captured on the first call of each shape)."""
        eng = self.engine(component)
        key = (component,) + tuple((k, tuple(v.shape)) for k, v in sorted(feeds.items()))
        if key not in self._graphs:
            static = {k: v.to(self.device, eng.dtypes[k]).contiguous().clone() for k, v in feeds.items()}
            eng.run(static, torch.cuda.current_stream(self.device))  # warm-up: TensorRT allocates on its first run
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # captures on a side stream made current for the block
                out = eng.run(static, torch.cuda.current_stream(self.device))
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for k, v in feeds.items():
            static[k].copy_(v)
        graph.replay()
        return out.float()

    @torch.no_grad()
    def decode(self, z):
        return self._run("vae_decoder", {"latent": z})

    @torch.no_grad()
    def encode(self, image):
        out = self._run("vae_encoder", {"image": image})
        return DiagonalGaussian(out) if self.model.config.vae.kind == "kl" else Deterministic(out)


def control_feeds(ucfg, x: torch.Tensor, t, context: torch.Tensor, hint: torch.Tensor, extra: dict,
                  device) -> dict[str, torch.Tensor]:
    """The controlnet engine's inputs (export/control_graphs.py) for one call; the batch is x's: the CFG
    batch, or the conditional half in guess mode."""
    b = x.shape[0]
    feeds = {"sample": x, "timestep": torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(b),
             "context": context, "hint": hint}
    if ucfg.num_classes is not None:
        if extra.get("class_labels") is None:
            raise ValueError("this ControlNet takes class labels: pass extra={'class_labels': ...}")
        feeds["class_labels"] = extra["class_labels"].long()
    if ucfg.time_cond_proj_dim is not None:  # no bias: zeros are the module without timestep_cond
        cond = extra.get("timestep_cond")
        feeds["timestep_cond"] = torch.zeros(b, ucfg.time_cond_proj_dim, device=device) if cond is None else cond
    return feeds


def residual_feeds(ucfg, control, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unet_control engine's residual inputs (down_0 ... mid); (B, C, 1, 1) ones (a global-pooling
    ControlNet) expanded to the size of their UNet level."""
    from ..export.control_graphs import matched_residuals

    return {name: r if tuple(r.shape) == want else r.expand(want)
            for name, r, want in matched_residuals(ucfg, control, z.shape)}
