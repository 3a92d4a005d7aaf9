"""AUTOMATIC1111's sampler and scheduler names onto ldm_engine's samplers, and back.

A1111 (since 1.9) names a sampler and a scheduler apart: "DPM++ 2M" + "Karras". "Automatic" means the
sampler's own scheduler, which for DPM++ 2M is Karras; the k-diffusion samplers otherwise space their
noise levels "Uniform"ly (k-diffusion's `get_sigmas`, what diffusers calls linspace spacing and what our
euler / dpmpp_2m run). A scheduler named at the end of the sampler's name wins ("DPM++ 2M Karras", the
pre-1.9 name, still parses). Names match case-insensitively; A1111's aliases ("k_euler_a") and our own
sampler names ("euler_a", "dpmpp_2m_karras") work too. Only what the samplers here really run is offered:
other A1111 samplers and schedulers are refused, with the list of those that work.
"""
from __future__ import annotations

from ..infotext import A1111_SAMPLER_NAMES
from ..sampling.samplers import SAMPLERS
from .limits import RequestError

# A1111 label, aliases, {scheduler: our sampler} ("automatic": the sampler's own), A1111's options
_SAMPLERS = [
    ("DPM++ 2M", ["k_dpmpp_2m"], {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras", "uniform": "dpmpp_2m"},
     {"scheduler": "karras"}),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"], {"automatic": "euler_a", "uniform": "euler_a"},
     {"uses_ensd": True}),
    ("Euler", ["k_euler"], {"automatic": "euler", "uniform": "euler"}, {}),
    ("LCM", ["k_lcm"], {"automatic": "lcm"}, {}),
    ("DDIM", ["ddim"], {"automatic": "ddim"}, {}),
    ("PLMS", ["plms"], {"automatic": "plms"}, {}),
    ("DDPM", ["ddpm"], {"automatic": "ddpm"}, {}),
    ("TCD", ["tcd"], {"automatic": "tcd"}, {}),
]
# name, label, aliases, default rho, needs the inner model (A1111's sd_schedulers.Scheduler fields)
_SCHEDULERS = [("automatic", "Automatic", None, -1.0, False), ("uniform", "Uniform", None, -1.0, True),
               ("karras", "Karras", None, 7.0, False)]
# names that imply a scheduler: A1111's pre-1.9 alias and our own Karras variant
_IMPLIED = {"k_dpmpp_2m_ka": ("dpm++ 2m", "karras"), "dpmpp_2m_karras": ("dpm++ 2m", "karras")}

_BY_NAME = {}
for _label, _aliases, _runs, _ in _SAMPLERS:
    for _key in (_label, *_aliases, *set(_runs.values())):
        _BY_NAME.setdefault(_key.lower(), (_label, _runs))
_SCHEDULER_KEYS = {k.lower(): name for name, label, aliases, *_ in _SCHEDULERS for k in (name, label, *(aliases or []))}


def a1111_sampler(sampler_name: str | None, scheduler: str | None = None) -> str:
    """Our sampler for A1111's (sampler_name, scheduler); None / "" name: A1111's API default "Euler",
    None / "" scheduler: "Automatic". Unknown or unsupported names -> RequestError listing the valid ones."""
    name = (sampler_name or "").strip() or "Euler"
    low = name.lower()
    sched = (scheduler or "").strip().lower() or "automatic"
    if low in SAMPLERS and _SCHEDULER_KEYS.get(sched) == "automatic":
        return low  # one of our own names, run as named
    for key in sorted(_SCHEDULER_KEYS, key=len, reverse=True):  # "DPM++ 2M Karras": the name's scheduler wins
        if low.endswith(" " + key):
            low, sched = low[:-len(key) - 1].strip(), key
            break
    if low in _IMPLIED:
        low, sched = _IMPLIED[low]
    if low not in _BY_NAME:
        raise RequestError(f"unknown sampler {name!r}; choose one of {', '.join(s[0] for s in _SAMPLERS)} "
                           "(GET /sdapi/v1/samplers)", "sampler_name", code="unknown_sampler")
    label, runs = _BY_NAME[low]
    if sched not in _SCHEDULER_KEYS:
        raise RequestError(f"unknown scheduler {scheduler!r}; choose one of "
                           f"{', '.join(s[1] for s in _SCHEDULERS)} (GET /sdapi/v1/schedulers)", "scheduler",
                           code="unknown_scheduler")
    ours = runs.get(_SCHEDULER_KEYS[sched])
    if ours is None:
        usable = ", ".join(s[1] for s in _SCHEDULERS if s[0] in runs)
        raise RequestError(f"sampler {label!r} does not run with scheduler {scheduler or sched!r} here; use "
                           f"{usable}", "scheduler", code="unsupported_scheduler")
    return ours


def a1111_samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem list (name, aliases, options) of what runs here."""
    return [{"name": label, "aliases": list(aliases), "options": dict(options)}
            for label, aliases, _, options in _SAMPLERS]


def a1111_schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's SchedulerItem list of the schedulers that run here."""
    return [{"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": inner}
            for name, label, aliases, rho, inner in _SCHEDULERS]


def infotext_sampler(sampler: str) -> dict:
    """The infotext's Sampler (A1111's name, as ldm-generate writes it) and, where A1111 since 1.9 would
    otherwise read another schedule ("DPM++ 2M" alone means Karras there), its `Schedule type`."""
    return {"Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler),
            "Schedule type": "Uniform" if sampler == "dpmpp_2m" else None}
