"""Reading LoRA / LyCORIS / PEFT files into one form: per adapted module, its tensors by role.

File layouts understood (key = <module><separator><role>):
    kohya / A1111 / LyCORIS  `lora_unet_<module_with_underscores>.<role>`, `lora_te_<...>.<role>`
        LoRA  (Hu et al. 2021): lora_down.weight, lora_up.weight, [lora_mid.weight: CP / Tucker core of a
              conv LoRA], [alpha], [dora_scale: DoRA magnitude, Liu et al. 2024]
        LoHa  (Hyeon-Woo et al. 2022, FedPara): hada_w1_a/b, hada_w2_a/b, [hada_t1/t2 Tucker cores]
        LoKr  (Yeh et al. 2024, LyCORIS): lokr_w1 | lokr_w1_a/b, lokr_w2 | lokr_w2_a/b, [lokr_t2]
    PEFT / diffusers  `unet.<dotted module>.lora_A.weight` / `lora_B.weight` (`text_encoder.` for the text
        encoder), alphas from the file's `lora_adapter_metadata` (PEFT LoraConfig) or `<module>.alpha` keys,
        DoRA magnitudes as `lora_magnitude_vector`
    older diffusers  `unet.<...>.processor.to_q_lora.down.weight` / `.up.weight`, `<...>.lora.down.weight`,
        `text_encoder.<...>.self_attn.to_q_lora.down.weight`, `<...>.lora_linear_layer.down.weight`

Module names stay as written; keymap.py resolves them onto the reference modules.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading.errors import CheckpointError
from ..loading.files import read_metadata, read_state_dict
from .errors import LoraError

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_METADATA_KEY = "lora_adapter_metadata"

# role names inside a kohya / LyCORIS module group, mapped onto the roles used here
_KOHYA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",  # PEFT role names under kohya module names
    "alpha": "alpha", "scale": "scale", "dora_scale": "dora_scale",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
}
# roles of adapter kinds this package does not merge, with the name users know them by
_UNSUPPORTED_ROLES = {
    "diff": "LyCORIS full (diff)", "diff_b": "LyCORIS full (diff_b)",
    "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R.weight": "BOFT", "weight": "IA3", "on_input": "IA3",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "bias": "a LoRA with bias terms", "lora_up.bias": "a LoRA with bias terms", "lora_B.bias": "a LoRA with bias terms",
    "wd_for_diff": "DoRA on the difference weight (wd_for_diff)",
    "dyn_up": "DyLoRA", "dyn_down": "DyLoRA",
}
_PEFT = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z_]\w*)?\.weight")
_PEFT_MAGNITUDE = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z_]\w*)?(?:\.weight)?")
_PEFT_BIAS = re.compile(r"(?P<module>.+)\.lora_B(?:\.[A-Za-z_]\w*)?\.bias")
_LEGACY_ATTN = re.compile(
    r"(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight")
_LEGACY = re.compile(r"(?P<module>.+?)\.lora(?:_linear_layer)?\.(?P<ud>down|up)\.weight")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class ModuleWeights:
    """The tensors a file holds for one adapted module, by role ('down', 'up', 'alpha', 'hada_w1_a', ...)."""

    key: str  # the module as the file names it
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source_keys: list[str] = field(default_factory=list)  # the file's keys, for error messages
    alpha: float | None = None  # PEFT metadata alpha (kohya files carry an 'alpha' tensor instead)
    rslora: bool = False  # PEFT use_rslora: scale alpha / sqrt(rank)
    dora: str | None = None  # 'a1111' (dora_scale) or 'peft' (lora_magnitude_vector)

    @property
    def kind(self) -> str:
        t = self.tensors
        if "hada_w1_a" in t or "hada_w2_a" in t:
            return "loha"
        if any(k.startswith("lokr_") for k in t):
            return "lokr"
        return "lora"


@dataclass
class LoraFile:
    path: Path
    modules: list[ModuleWeights]
    layout: str  # 'kohya', 'peft', 'diffusers-legacy' (or several, joined by '+')
    metadata: dict[str, str]
    foreign_keys: list[str] = field(default_factory=list)  # keys of no adapter layout (counted as unmatched)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module, role, layout) of one key, None for keys that belong to no adapter layout known here."""
    key = key.removeprefix("base_model.model.")
    head, _, rest = key.partition(".")
    if head.startswith(KOHYA_PREFIXES) and rest:
        return head, rest, "kohya"
    if m := _PEFT.fullmatch(key):
        return m["module"], "down" if m["ab"] == "A" else "up", "peft"
    if m := _PEFT_MAGNITUDE.fullmatch(key):
        return m["module"], "magnitude", "peft"
    if m := _PEFT_BIAS.fullmatch(key):
        return m["module"], "lora_B.bias", "peft"
    if m := _LEGACY_ATTN.fullmatch(key):
        parent, proj = m["parent"], m["proj"]
        module = (f"{parent}.{_TEXT_PROJ[proj]}" if parent.endswith("self_attn")
                  else f"{parent}.{'to_out.0' if proj == 'to_out' else proj}")
        return module, m["ud"], "diffusers-legacy"
    if m := _LEGACY.fullmatch(key):
        return m["module"], m["ud"], "diffusers-legacy"
    if m := _ALPHA.fullmatch(key):
        return m["module"], "alpha", "peft"
    return None


def _peft_alphas(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """{component prefix ('unet', 'text_encoder', ''): PEFT LoraConfig fields} from a diffusers file's metadata."""
    text = metadata.get(PEFT_METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: malformed {PEFT_METADATA_KEY} metadata ({e})") from None
    configs: dict[str, dict] = {}
    for k, v in flat.items():
        prefix, _, name = k.rpartition(".")
        configs.setdefault(prefix, {})[name] = v
    return configs


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha pattern lookup: a pattern matches a module name it ends (after a dot)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _apply_peft_config(mod: ModuleWeights, configs: dict[str, dict]) -> None:
    prefix, _, rel = mod.key.partition(".")
    cfg = configs.get(prefix) if rel else None
    if cfg is None:
        cfg, rel = configs.get(""), mod.key
    if cfg is None or "lora_alpha" not in cfg:
        return
    alpha = _pattern_value(cfg.get("alpha_pattern"), rel)
    mod.alpha = float(cfg["lora_alpha"] if alpha is None else alpha)
    mod.rslora = bool(cfg.get("use_rslora", False))


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and string metadata; every failure is a LoraError naming the file."""
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix not in (".safetensors", ".pt", ".ckpt", ".pth", ".bin"):
        raise LoraError(f"{path}: unknown LoRA format {path.suffix!r}; expected .safetensors (or .pt/.ckpt/.bin)")
    try:
        sd = read_state_dict(path)
        metadata = read_metadata(path)
    except CheckpointError as e:
        msg = str(e)
        if "holds no tensors" in msg:
            raise LoraError(f"{path}: the file holds no tensors: an empty LoRA file") from None
        raise LoraError(f"cannot read the LoRA file: {msg}") from None
    return sd, metadata


def parse_lora(path: str | Path) -> LoraFile:
    """Read and group one adapter file. Raises LoraError for files that hold no adapter, keys of
    adapter kinds that are not supported, incomplete pairs and non-finite tensors."""
    path = Path(path)
    sd, metadata = read_tensors(path)
    groups: dict[str, ModuleWeights] = {}
    layouts, foreign = set(), []
    for key, value in sd.items():
        split = _split_key(key)
        if split is None:
            foreign.append(key)
            continue
        module, role, layout = split
        if layout == "kohya":
            if role not in _KOHYA_ROLES:
                what = _UNSUPPORTED_ROLES.get(role)
                raise LoraError(f"{path}: key {key!r} belongs to {what or 'an adapter kind'} that is not supported "
                                f"(LoRA, LoCon, LoHa, LoKr and DoRA are); convert the file to LoRA, e.g. with "
                                f"kohya-ss' resize/extract tools")
            role = _KOHYA_ROLES[role]
        elif role in _UNSUPPORTED_ROLES:
            raise LoraError(f"{path}: key {key!r}: {_UNSUPPORTED_ROLES[role]} is not supported")
        if not torch.isfinite(value).all():
            raise LoraError(f"{path}: tensor {key!r} holds NaN or inf; the file is damaged (or was trained into "
                            f"divergence) and cannot be merged")
        mod = groups.setdefault(module, ModuleWeights(module))
        if role in mod.tensors:
            raise LoraError(f"{path}: module {module!r} has two tensors for {role!r} (keys "
                            f"{mod.source_keys} and {key!r})")
        mod.tensors[role] = value
        mod.source_keys.append(key)
        layouts.add(layout)
    adapters = [m for m in groups.values() if set(m.tensors) - {"alpha", "scale"}]
    if not adapters:
        sample = ", ".join(list(sd)[:3])
        hint = (" It looks like a model checkpoint: load it with Pipeline.from_pretrained."
                if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                                     "down_blocks.", "encoder.", "text_model.")) for k in sd) else "")
        raise LoraError(f"{path}: not a LoRA / LyCORIS file: no lora_down/lora_up, lora_A/lora_B, hada_ or lokr_ "
                        f"keys (found e.g. {sample}).{hint}")
    configs = _peft_alphas(metadata, path)
    for mod in adapters:
        _check_complete(mod, path)
        if "magnitude" in mod.tensors:
            mod.dora = "peft"
        elif "dora_scale" in mod.tensors:
            mod.dora = "a1111"
        if "alpha" not in mod.tensors and configs:
            _apply_peft_config(mod, configs)
    return LoraFile(path, adapters, "+".join(sorted(layouts)), metadata, foreign)


def _check_complete(mod: ModuleWeights, path: Path) -> None:
    t = mod.tensors
    kind = mod.kind
    if kind == "lora":
        missing = [r for r in ("down", "up") if r not in t]
    elif kind == "loha":
        missing = [r for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if r not in t]
        if ("hada_t1" in t) != ("hada_t2" in t):
            missing.append("hada_t2" if "hada_t1" in t else "hada_t1")
    else:
        missing = []
        for i in ("1", "2"):
            if f"lokr_w{i}" not in t and not (f"lokr_w{i}_a" in t and f"lokr_w{i}_b" in t):
                missing.append(f"lokr_w{i} (or lokr_w{i}_a and lokr_w{i}_b)")
    if missing:
        raise LoraError(f"{path}: module {mod.key!r} is incomplete: missing {', '.join(missing)} "
                        f"(has {', '.join(sorted(t))})")
    if "magnitude" in t and "dora_scale" in t:
        raise LoraError(f"{path}: module {mod.key!r} has both DoRA magnitudes (dora_scale and lora_magnitude_vector)")
