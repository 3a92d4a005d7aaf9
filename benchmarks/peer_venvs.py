"""Virtual environments of their own for peers whose pins differ from ldm_engine's, created once and
reused (under ~/.cache/ldm_engine/peers, or $LDM_ENGINE_PEERS).

A venv is reused while its marker (`ready.json`) records the same requirements, and — for a peer built
from source with `-march=native` — the same CPU: a venv built on another machine kind is rebuilt rather
than run with instructions this CPU may not have. torch is pinned to the CPU wheel the project uses (a
constraint, so no dependency can pull a multi-GB CUDA build), and torchvision is removed after the install:
PyPI's torchvision fails to import beside that wheel, and optimum-intel's diffusion path runs without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    name: str
    requirements: tuple[str, ...]
    probe: str  # a statement that must run in the venv for it to count as usable
    remove: tuple[str, ...] = ()  # packages uninstalled after the install (see the module docstring)
    native_build: bool = False  # compiled here for this CPU: the marker records the CPU
    env: dict = field(default_factory=dict)  # extra environment for pip (CMAKE_ARGS for native builds)


PEERS = {
    "optimum-intel": Peer(
        "optimum-intel", (TORCH_PIN, "optimum-intel[openvino,diffusers]==2.2.0"),
        probe="from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig",
        remove=("torchvision",)),
    "stable-diffusion-cpp": Peer(
        "stable-diffusion-cpp", ("stable-diffusion-cpp-python==0.4.7", "numpy", "pillow"),
        probe="import stable_diffusion_cpp", native_build=True,
        env={"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}),
}


def peers_root() -> Path:
    return Path(os.environ.get("LDM_ENGINE_PEERS", Path.home() / ".cache" / "ldm_engine" / "peers"))


def cpu_signature() -> dict:
    """The CPU model and the ISA flags a -march=native build depends on."""
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    keep = sorted(f for f in flags.split() if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    return {"cpu": model, "flags": keep}


def marker_for(peer: Peer) -> dict:
    m = {"requirements": list(peer.requirements), "remove": list(peer.remove), "python": sys.version.split()[0]}
    if peer.native_build:
        m |= cpu_signature()
    return m


def venv_python(peer: Peer, root: Path | None = None) -> Path:
    return (root or peers_root()) / peer.name / "bin" / "python"


def ensure_venv(peer: Peer, root: Path | None = None, say=print) -> tuple[Path | None, str | None]:
    """(python of a ready venv, None), or (None, why it could not be made). Installs only when the marker
    is missing or differs; a failed install leaves no marker, so the next run tries again."""
    root = root or peers_root()
    folder = root / peer.name
    marker_file = folder / "ready.json"
    want = marker_for(peer)
    python = venv_python(peer, root)
    if marker_file.is_file() and python.is_file():
        try:
            if json.loads(marker_file.read_text()) == want:
                return python, None
        except json.JSONDecodeError:
            pass
    marker_file.unlink(missing_ok=True)
    say(f"[{peer.name}] preparing its virtual environment in {folder} (once; a native build takes minutes)")
    try:
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, text=True)
        constraints = folder / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")  # nothing may swap the CPU wheel for a CUDA build
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
        if peer.native_build:  # a wheel cached from another CPU would carry that CPU's instructions
            pip += ["--no-cache-dir", "--force-reinstall"]
        env = {**os.environ, **peer.env}
        subprocess.run(pip + list(peer.requirements), check=True, capture_output=True, text=True, env=env)
        if peer.remove:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *peer.remove], check=True,
                           capture_output=True, text=True)
        subprocess.run([str(python), "-c", peer.probe], check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, OSError) as e:
        tail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-3:]
        return None, f"could not prepare its venv: {' | '.join(tail)}"
    marker_file.write_text(json.dumps(want, indent=1))
    return python, None
