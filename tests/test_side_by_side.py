"""benchmarks/side_by_side.py's parts that run without the peers' venvs: the model files the peers read,
the venv reuse rules, the report's PSNR and skip rows, a failing peer process, and a run of the
project's own suites on a tiny architecture with the JSON fields the README documents."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import peer_venvs  # noqa: E402
import side_by_side  # noqa: E402
from peer_fixtures import write_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures("tiny-sd1", 8, tmp_path_factory.mktemp("sbs"), say=lambda m: None)


def test_fixture_files_hold_one_set_of_weights(fixtures):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from ldm_engine.loading import load_checkpoint

    folder, single = load_checkpoint(fixtures["diffusers"]), load_checkpoint(fixtures["single_file"])
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae), (folder.text_encoder, single.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the text encoder under the prefix every transformers release reads (see canonical_text_keys)
    with safe_open(str(next((fixtures["diffusers"] / "text_encoder").glob("*.safetensors"))), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    pipe = StableDiffusionPipeline.from_pretrained(fixtures["diffusers"], safety_checker=None)
    assert pipe.unet.config.sample_size == 8
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids)[0]
        ours = folder.text_encoder(folder.tokenizer(["a red circle"]))
    assert torch.equal(folder.tokenizer(["a red circle"]), ids)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_fixtures_are_written_once(fixtures):
    stamp = fixtures["single_file"].stat().st_mtime_ns
    again = write_fixtures("tiny-sd1", 8, fixtures["single_file"].parent.parent, say=pytest.fail)
    assert again == fixtures and fixtures["single_file"].stat().st_mtime_ns == stamp


def fake_venv(root: Path, peer, marker: dict | None):
    python = peer_venvs.venv_python(peer, root)
    python.parent.mkdir(parents=True)
    python.write_text("")
    if marker is not None:
        (root / peer.name / "ready.json").write_text(json.dumps(marker))


def test_a_ready_venv_is_reused_without_pip(tmp_path, monkeypatch):
    peer = peer_venvs.PEERS["optimum-intel"]
    fake_venv(tmp_path, peer, peer_venvs.marker_for(peer))
    monkeypatch.setattr(peer_venvs.subprocess, "run", lambda *a, **k: pytest.fail("pip ran for a ready venv"))
    assert peer_venvs.ensure_venv(peer, tmp_path, say=pytest.fail) == (peer_venvs.venv_python(peer, tmp_path), None)


def test_a_native_build_from_another_cpu_is_rebuilt(tmp_path, monkeypatch):
    peer = peer_venvs.PEERS["stable-diffusion-cpp"]
    marker = peer_venvs.marker_for(peer)
    assert marker["cpu"] and "flags" in marker  # native builds record the CPU they were built for
    fake_venv(tmp_path, peer, {**marker, "flags": ["avx512f", "amx_tile"]})
    calls = []
    monkeypatch.setattr(peer_venvs.subprocess, "run", lambda cmd, **k: calls.append(cmd))
    python, why = peer_venvs.ensure_venv(peer, tmp_path, say=lambda m: None)
    assert why is None and python is not None
    pip = next(c for c in calls if "pip" in c and "install" in c)
    assert "--no-cache-dir" in pip and "stable-diffusion-cpp-python==0.4.7" in pip
    assert json.loads((tmp_path / peer.name / "ready.json").read_text()) == marker


def test_a_failed_install_says_why_and_leaves_no_marker(tmp_path, monkeypatch):
    peer = peer_venvs.PEERS["optimum-intel"]
    fake_venv(tmp_path, peer, None)

    def pip_fails(cmd, **k):
        if "install" in cmd:
            raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found for x==9")
    monkeypatch.setattr(peer_venvs.subprocess, "run", pip_fails)
    python, why = peer_venvs.ensure_venv(peer, tmp_path, say=lambda m: None)
    assert python is None and "No matching distribution found for x==9" in why
    assert not (tmp_path / peer.name / "ready.json").exists()
    constraints = (tmp_path / peer.name / "constraints.txt").read_text()
    assert constraints.strip() == peer_venvs.TORCH_PIN  # no dependency may pull another torch


def test_report_psnr_ratios_and_skipped_rows(tmp_path, capsys):
    ref = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    near = ref + 0.01
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "near.npy", near)
    rows = [
        {"suite": "ldm_engine", "backend": "ldm_engine torch", "precision": "fp32", "unet_step_s": 4.0,
         "end_to_end_s": 40.0, "image": str(tmp_path / "ref.npy"), "reference": True},
        {"suite": "ldm_engine", "backend": "ldm_engine openvino", "precision": "fp32", "unet_step_s": 2.0,
         "end_to_end_s": 20.0, "image": str(tmp_path / "ref.npy"), "reference": False},
        {"suite": "ldm_engine", "backend": "ldm_engine openvino", "precision": "int8", "unet_step_s": 1.0,
         "end_to_end_s": 10.0, "image": str(tmp_path / "near.npy"), "reference": False},
        {"suite": "optimum-intel", "backend": "optimum-intel default", "precision": "f32", "unet_step_s": 3.0,
         "end_to_end_s": 33.0, "image": str(tmp_path / "near.npy")},
        {"suite": "stable-diffusion.cpp", "backend": "stable-diffusion.cpp", "skipped": "exited with 1: no wheel"},
    ]
    side_by_side.add_psnr(rows)
    assert rows[0]["psnr_db"] is None and rows[1]["psnr_db"] is None  # identical to the reference
    assert rows[3]["psnr_db"] == pytest.approx(40.0, abs=0.01)
    assert all("image" not in r and "reference" not in r for r in rows)
    side_by_side.report(rows)
    out = capsys.readouterr().out
    assert "skipped: exited with 1: no wheel" in out
    assert "best exact ldm_engine backend per UNet step: ldm_engine openvino fp32 (2.000 s)" in out
    assert "vs optimum-intel default (f32): exact 1.50x per UNet step, int8 3.00x; end to end 1.65x" in out


def test_a_failing_peer_keeps_its_rows_and_says_how_it_ended(tmp_path):
    child = tmp_path / "child.py"
    child.write_text("import json, sys\nprint(json.dumps({'suite': 'p', 'backend': 'p a', 'unet_step_s': 1.0}))\n"
                     "print('loading the model', file=sys.stderr)\nraise SystemExit('model file not understood')\n")
    said = []
    rows = side_by_side.run_child([sys.executable, str(child)], "p", said.append)
    assert rows[0]["backend"] == "p a"
    assert rows[1] == {"suite": "p", "backend": "p", "skipped": "exited with 1: model file not understood"}
    assert "loading the model" in said


def test_own_suites_run_end_to_end_with_machine_fields(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "side_by_side.py"), "--arch", "tiny-sd1",
                          "--res", "64", "--steps", "3", "--repeat", "1", "--work", str(tmp_path),
                          "--skip", "diffusers", "optimum-intel", "stable-diffusion.cpp", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    backends = {(r["backend"], r.get("precision")) for r in rows}
    assert {("ldm_engine torch", "fp32"), ("ldm_engine openvino", "int8"), ("onnxruntime", "f32")} <= backends
    for r in rows:
        assert r["cpu"] and "isa" in r and r["res"] == 64 and r["steps"] == 3 and r["unet_step_s"] > 0
    int8 = next(r for r in rows if r.get("precision") == "int8")
    assert 20 < int8["psnr_db"] < 80  # quantized: close to the fp32 image, not identical
    assert "best exact ldm_engine backend per UNet step" in run.stdout


def test_bf16_rows_only_where_the_cpu_has_native_bf16():
    plain, native = side_by_side.own_configs("ldm_engine", False), side_by_side.own_configs("ldm_engine", True)
    assert "torch:bf16" not in plain and {"torch:bf16", "openvino:fp32"} <= set(native)
    assert side_by_side.own_configs("diffusers", False)[-1] == "torch.compile fp32"
    assert side_by_side.own_configs("diffusers", True)[-1] == "torch.compile bf16"
