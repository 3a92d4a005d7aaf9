"""What the ONNX-graph backends (ONNX Runtime, OpenVINO) share: where the graphs come from, and the
backend interface (encode_text / denoise / decode / encode / embed_class) written once on top of a
runtime's `_run_all(component, feeds) -> arrays`.

Graphs come from `onnx_dir` (a folder written by `python export/export_onnx.py`, holding
<component>.onnx) or else from the artifact cache, exported from the loaded model on first use.

ControlNets run as two graphs (export/control_graphs.py): each ControlNet's own graph makes the
residuals (`controlnet`), and `denoise` with extra["control"] runs the UNet graph that takes them as
inputs (`unet_control`); both come from the artifact cache, or from onnx_dir when export_onnx.py wrote
them there (`--controlnet FILE`: found by the pipeline's name for the ControlNet, checked by its weights).
"""
from __future__ import annotations

import os
import weakref
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from ..models.autoencoder import DiagonalGaussian, Deterministic
from ..models.autoencoder_blocks import _check_image
from .base_graphs import BaseGraphs


def physical_cores() -> int:
    """Cores, not hardware threads: one inference thread per core is fastest for these graphs."""
    try:
        seen = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    seen.add((phys, core))
        allowed = len(os.sched_getaffinity(0))
        if seen:
            return max(1, min(len(seen), allowed))
    except (OSError, AttributeError):
        pass
    return os.cpu_count() or 1


class GraphBackend(ABC):
    """Base of the ONNX-graph backends. Tensors in and out are CPU float32 torch tensors (int64 for ids
    and labels); latents are the autoencoder's own, unscaled ones, as with the torch backend."""

    name = "graph"
    graph_capturable = False  # the runtime owns its own streams: never inside the pipeline's CUDA graph
    accepts_control = True  # controlnet() runs a ControlNet's graph; denoise takes its residuals

    def __init__(self, model, device="cpu", onnx_dir: str | os.PathLike | None = None, cache_dir=None,
                 progress: bool = True):
        from ..export.graphs import available_components

        self.model = model
        self.device = torch.device(device)
        self.onnx_dir = Path(onnx_dir) if onnx_dir is not None else None
        self.progress = progress
        self._components = available_components(model)
        self._cache = None
        self.base_graphs = BaseGraphs()  # the UNet graph of the original weights, reused after a LoRA
        self._control_keys: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # ControlNet -> graph key
        self._control_nets: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # graph key -> ControlNet
        self._dir_graphs: dict[str, Path] = {}  # graph key -> its ControlNet's graph in onnx_dir
        if self.onnx_dir is None:
            from ..export.cache import ArtifactCache

            self._cache = ArtifactCache(cache_dir)
        elif not self.onnx_dir.is_dir():
            raise FileNotFoundError(f"onnx_dir {self.onnx_dir} is not a folder; export one with "
                                    f"python export/export_onnx.py --model MODEL --out {self.onnx_dir}")

    # ---- where graphs come from ------------------------------------------------------------------

    def graph_path(self, component: str) -> Path:
        """`component`, or a graph key made by graph_key (the text encoder for another output layer)."""
        component, output_layer = split_graph_key(component)
        if component == "unet_control" or component in self._control_nets:
            return self._control_graph_path(component)
        from ..export.step_cache_graphs import parse_cache_component

        if parse_cache_component(component) is not None:  # the step cache's graphs: from the artifact cache
            if self.onnx_dir is not None:
                raise ValueError(f"cache_interval needs the step cache's UNet graphs, and onnx_dir {self.onnx_dir} holds "
                                 "the model's own ones only; leave onnx_dir unset (graphs then come from the artifact "
                                 "cache) or leave cache_interval unset")
            from ..export.artifacts import onnx_artifact

            return onnx_artifact(self.model, component, "fp32", None, self._cache, self.progress)
        if component not in self._components:
            raise ValueError(f"this model has no {component}")
        if self.onnx_dir is not None:
            if output_layer is not None:
                raise ValueError(f"clip skip needs a text encoder graph ending at layer {output_layer}, and onnx_dir "
                                 f"{self.onnx_dir} holds the model's own one only; leave onnx_dir unset (graphs then "
                                 "come from the artifact cache) or use the model's own layer")
            path = self.onnx_dir / f"{component}.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; export it with python export/export_onnx.py "
                                        f"--model MODEL --out {self.onnx_dir}")
            return path
        from ..export.artifacts import onnx_artifact

        return onnx_artifact(self.model, component, "fp32", None, self._cache, self.progress, output_layer=output_layer)

    def _control_graph_path(self, key: str) -> Path:
        if self.onnx_dir is not None:  # prepare_controlnet found and checked them
            return self.onnx_dir / "unet_control.onnx" if key == "unet_control" else self._dir_graphs[key]
        from ..export.artifacts import controlnet_artifact, onnx_artifact

        if key == "unet_control":
            return onnx_artifact(self.model, key, "fp32", None, self._cache, self.progress)
        return controlnet_artifact(self.model, self._control_nets[key], "fp32", None, self._cache, self.progress)

    def graph_source(self, key: str) -> tuple[Path, dict[str, np.ndarray]]:
        """The graph to load for a graph key, and the initializers to replace in it: after a LoRA the UNet
        keeps the graph of its original weights plus the changed tensors (no new export), everything else
        resolves the graph of the weights as they are."""
        component, output_layer = split_graph_key(key)
        if self.onnx_dir is None and output_layer is None and self.base_graphs.applies(component):
            from ..export.artifacts import component_module, onnx_artifact

            module = component_module(self.model, component)
            path = self.base_graphs.path(component, module, lambda: onnx_artifact(
                self.model, component, "fp32", None, self._cache, self.progress))
            try:
                return path, self.base_graphs.overrides(component, module)
            except KeyError:  # logged; this component re-exports from now on
                pass
        return self.graph_path(key), {}

    def reload(self, component: str) -> None:
        """Drop the loaded graphs of `component` (every output layer of the text encoder): the next call
        resolves them again. Call it after the model's weights changed: the artifact cache key hashes the
        weights, so new weights export a new graph and restored ones find their old graph again."""
        if self.onnx_dir is not None:
            raise ValueError(f"the graphs in onnx_dir {self.onnx_dir} are fixed, so the model's {component} weights "
                             "cannot change (textual inversion, LoRA); leave onnx_dir unset: graphs then come from "
                             "the artifact cache, exported from the model as it is")
        for key in [k for k in self._loaded_keys() if _weights_of(split_graph_key(k)[0]) == component]:
            self._forget(key)

    def check_weights_changeable(self, components) -> None:
        """Raise before the model's weights change (LoRA) when this backend could not follow: fixed graphs."""
        if self.onnx_dir is not None:
            raise ValueError(f"the graphs in onnx_dir {self.onnx_dir} are fixed, so the model's "
                             f"{' and '.join(components)} weights cannot change (LoRA); leave onnx_dir unset: graphs "
                             "then come from the artifact cache, exported from the model as it is")

    @abstractmethod
    def _loaded_keys(self) -> list[str]:
        """The graph keys this runtime holds loaded graphs for."""

    @abstractmethod
    def _forget(self, key: str) -> None:
        """Drop everything loaded or compiled for one graph key."""

    @abstractmethod
    def _run_all(self, component: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one component's graph (or a graph key's) on named numpy inputs; its outputs, in order."""

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first (for every component but the ControlNet, only) output of a graph."""
        return self._run_all(component, feeds)[0]

    # ---- ControlNets -----------------------------------------------------------------------------

    def prepare_controlnet(self, net: torch.nn.Module, name: str | None = None) -> None:
        """Check that this backend can run ControlNet `net` and keep it where its graph is exported from
        (float32 on the CPU: the graphs are exported in fp32 and the runtime picks its own precision).
        With onnx_dir, its graph is the one export_onnx.py wrote there for `name` (the pipeline's name for
        it), refused when that graph was made from other weights."""
        net.to("cpu", torch.float32)
        if self.onnx_dir is not None:
            from ..export.control_graphs import controlnet_weights_hash, find_control_graph

            path = find_control_graph(self.onnx_dir, name, controlnet_weights_hash(net))
            self._dir_graphs[self._control_key(net)] = path

    def _control_key(self, net: torch.nn.Module) -> str:
        """The graph key of a ControlNet: `controlnet#` + its weights hash (one graph per distinct net)."""
        key = self._control_keys.get(net)
        if key is None:
            from ..export.cache import weights_hash

            key = f"controlnet#{weights_hash(net, net.control_config)}"
            self._control_keys[net] = key
            self._control_nets[key] = net
            # an unloaded ControlNet's session / compiled graphs go with it
            weakref.finalize(net, _forget_later, weakref.ref(self), key)
        return key

    @torch.no_grad()
    def controlnet(self, net: torch.nn.Module, x: torch.Tensor, t, context: torch.Tensor, hint: torch.Tensor,
                   extra: dict | None = None) -> list[torch.Tensor]:
        """ControlNet `net`'s residuals at scale 1 (one per UNet input block, then the middle block's) for
        latents x (B, 4, h, w), timestep t, context (B, L, D) and control image hint (B, 3, H, W) in [0, 1],
        run by its own graph."""
        extra = extra or {}
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).cpu()
        feeds = {"sample": _np(x, np.float32), "timestep": np.ascontiguousarray(np.broadcast_to(t.numpy(), (b,))),
                 "context": _np(context, np.float32), "hint": _np(hint, np.float32)}
        ucfg = net.control_config.unet
        if ucfg.num_classes is not None:
            if extra.get("class_labels") is None:
                raise ValueError("this ControlNet takes class labels: pass extra={'class_labels': ...}")
            feeds["class_labels"] = _np(extra["class_labels"], np.int64)
        if ucfg.time_cond_proj_dim is not None:  # no bias: zeros are the module without timestep_cond
            cond = extra.get("timestep_cond")
            feeds["timestep_cond"] = (np.zeros((b, ucfg.time_cond_proj_dim), np.float32) if cond is None
                                      else _np(cond, np.float32))
        return [torch.from_numpy(r) for r in self._run_all(self._control_key(net), feeds)]

    def _residual_feeds(self, control, z: torch.Tensor) -> dict[str, np.ndarray]:
        """The unet_control graph's residual inputs; (B, C, 1, 1) ones (global pooling) broadcast to size."""
        from ..export.control_graphs import matched_residuals

        feeds = {}
        for name, r, want in matched_residuals(self.model.config.unet, control, z.shape):
            a = _np(r, np.float32)
            feeds[name] = a if a.shape == want else np.ascontiguousarray(np.broadcast_to(a, want))
        return feeds

    # ---- the backend interface -------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, output_layer: int | None = None) -> torch.Tensor:
        """`output_layer` None: the text encoder's own; another layer runs a graph exported for it."""
        key = graph_key("text_encoder", output_layer, self.model.text_encoder.config.output_layer)
        return torch.from_numpy(self._run(key, {"input_ids": _np(ids, np.int64)}))

    @torch.no_grad()
    def embed_class(self, labels: torch.Tensor) -> torch.Tensor:
        # a table lookup of (B,) labels -> (B, 1, D): no graph runtime is worth its call overhead here
        return self.model.class_embedder(labels.cpu()).float()

    def _unet_feeds(self, z: torch.Tensor, t, context: torch.Tensor | None, extra: dict) -> dict[str, np.ndarray]:
        """The UNet graph's inputs (sample, timestep, and context / class labels / timestep_cond where it has them)."""
        b = z.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).cpu()
        feeds = {"sample": _np(z, np.float32), "timestep": np.ascontiguousarray(np.broadcast_to(t.numpy(), (b,)))}
        if self.model.config.unet.context_dim:
            if context is None:
                raise ValueError("this UNet is conditioned: denoise needs a context")
            feeds["context"] = _np(context, np.float32)
        if self.model.config.unet.num_classes is not None:
            labels = extra.get("class_labels")
            if labels is None:
                raise ValueError("this UNet takes class labels (or noise levels): pass extra={'class_labels': ...}")
            feeds["class_labels"] = _np(labels, np.int64)
        if (dim := self.model.config.unet.time_cond_proj_dim) is not None:  # LCM-distilled: the guidance embedding
            cond = extra.get("timestep_cond")
            # the projection has no bias, so a zero embedding is exactly the torch UNet without timestep_cond
            feeds["timestep_cond"] = np.zeros((b, dim), np.float32) if cond is None else _np(cond, np.float32)
        return feeds

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, t, context: torch.Tensor | None, extra: dict | None = None) -> torch.Tensor:
        extra = extra or {}
        feeds = self._unet_feeds(z, t, context, extra)
        if extra.get("control") is not None:  # ControlNet residuals: the UNet graph that adds them
            feeds |= self._residual_feeds(extra["control"], z)
            return torch.from_numpy(self._run("unet_control", feeds))
        return torch.from_numpy(self._run("unet", feeds))

    @torch.no_grad()
    def denoise_cached(self, z: torch.Tensor, t, context: torch.Tensor | None, extra: dict | None, branch: int,
                       feature: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A step of the step cache (ldm_engine.optimize.step_cache): the deep graph when `feature` is None,
        returning (output, the feature at `branch`), else the shallow graph on that feature (output, feature)."""
        from ..export.step_cache_graphs import cache_component

        feeds = self._unet_feeds(z, t, context, extra or {})
        if feature is None:
            out, feature = self._run_all(cache_component("deep", branch), feeds)
            return torch.from_numpy(out), torch.from_numpy(feature)
        feeds["cached_feature"] = _np(feature, np.float32)
        return torch.from_numpy(self._run(cache_component("shallow", branch), feeds)), feature

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._run("vae_decoder", {"latent": _np(z, np.float32)}))

    @torch.no_grad()
    def encode(self, image: torch.Tensor):
        _check_image(image, self.model.config.vae.downsampling_factor, "image")  # the reference's own check
        if image.shape[1] != 3:
            raise ValueError(f"image must have 3 channels, got shape {tuple(image.shape)}")
        out = torch.from_numpy(self._run("vae_encoder", {"image": _np(image, np.float32)}))
        return DiagonalGaussian(out) if self.model.config.vae.kind == "kl" else Deterministic(out)


def graph_key(component: str, output_layer: int | None = None, own_layer: int | None = None) -> str:
    """The name a runtime keeps one graph under: the component, or `text_encoder@-2` for the text
    encoder exported to end at another layer than its own (clip skip)."""
    return component if output_layer is None or output_layer == own_layer else f"{component}@{output_layer}"


def _forget_later(backend_ref: "weakref.ref", key: str) -> None:
    backend = backend_ref()
    if backend is not None and key not in backend._control_nets:  # not taken over by an identical net
        backend._forget(key)


def _weights_of(component: str) -> str | None:
    """The model component whose weights a graph carries (None for a ControlNet's own graph)."""
    from ..export.artifacts import weights_component

    return None if component.startswith("controlnet#") else weights_component(component)


def split_graph_key(key: str) -> tuple[str, int | None]:
    component, _, layer = key.partition("@")
    return component, int(layer) if layer else None


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    """A C-contiguous numpy view (or copy, when the dtype or device differs) of a tensor."""
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
        t = t.float()
    return np.ascontiguousarray(t.numpy().astype(dtype, copy=False))
