"""The artifact cache: keys, reuse, rebuild of damaged artifacts, racing builders, first-use export."""
from __future__ import annotations

import multiprocessing
import os
import time
import warnings

import pytest
import torch

from ldm_engine.export import cache as cache_mod
from ldm_engine.export.cache import ArtifactCache, artifact_key, cache_root, verify, weights_hash


def _build_counter(calls: list, payload: bytes = b"graph bytes"):
    def build(folder):
        calls.append(folder)
        (folder / "model.onnx").write_bytes(payload)
        return {"note": "test"}

    return build


def test_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_ENGINE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("LDM_ENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "ldm_engine"


def test_weights_hash_tracks_weights_not_identity():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)
    before = weights_hash(a)
    with torch.no_grad():
        a.weight[0, 0] += 1.0  # in place: the remembered hash must not be reused
    assert weights_hash(a) != before
    assert weights_hash(b, {"config": 1}) != weights_hash(b, {"config": 2})


def test_keys_hold_every_part_and_refuse_unsafe_ones():
    key = artifact_key("unet", "0123abcd", "dynamic", "fp32", "ldm0.1_torch2.13_opset17")
    assert key == "unet-0123abcd-dynamic-fp32-ldm0.1_torch2.13_opset17"
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            artifact_key("unet", bad, "dynamic", "fp32", "rt")


def test_built_once_then_reused(tmp_path):
    calls = []
    c = ArtifactCache(tmp_path)
    first = c.get_or_build("onnx", "k1", _build_counter(calls))
    again = c.get_or_build("onnx", "k1", _build_counter(calls))
    assert first == again and len(calls) == 1
    assert (first / "model.onnx").read_bytes() == b"graph bytes" and verify(first) is None
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["k1"]  # no temporary folders left


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete_meta", "delete_file"])
def test_a_damaged_artifact_is_rebuilt_with_a_warning(tmp_path, damage):
    calls = []
    c = ArtifactCache(tmp_path)
    folder = c.get_or_build("onnx", "k", _build_counter(calls))
    target = folder / "model.onnx"
    if damage == "truncate":
        target.write_bytes(b"graph")
    elif damage == "edit":
        target.write_bytes(b"GRAPH BYTES")  # same size, other bytes
    elif damage == "delete_meta":
        (folder / "meta.json").unlink()
    else:
        target.unlink()
    with pytest.warns(UserWarning, match="damaged"):
        again = c.get_or_build("onnx", "k", _build_counter(calls))
    assert len(calls) == 2 and (again / "model.onnx").read_bytes() == b"graph bytes" and verify(again) is None


def test_a_failed_build_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        ArtifactCache(tmp_path).get_or_build("onnx", "k", broken)
    assert list((tmp_path / "onnx").iterdir()) == []


def _race(root, start_at, out_queue):
    def slow(folder):
        (folder / "model.onnx").write_bytes(os.urandom(1 << 16))  # each builder writes different bytes
        time.sleep(max(0.0, start_at - time.time()) + 0.2)
        return {"pid": os.getpid()}

    while time.time() < start_at:
        time.sleep(0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a racing peer must not look like damage
        folder = ArtifactCache(root).get_or_build("onnx", "shared", slow)
    out_queue.put(str(folder))


def test_racing_processes_get_one_intact_artifact(tmp_path):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(tmp_path, start_at, q)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    folders = {q.get(timeout=5) for _ in procs}
    assert len(folders) == 1
    folder = cache_mod.Path(folders.pop())
    assert verify(folder) is None
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == ["shared"]


def test_graphs_are_exported_on_first_use_only(tiny_sd1, tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from ldm_engine.export import artifacts

    calls = []
    real = artifacts.export_component

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(artifacts, "export_component", counting)
    c = ArtifactCache(tmp_path)
    p1 = artifacts.onnx_artifact(tiny_sd1, "vae_decoder", cache=c, progress=False)
    p2 = artifacts.onnx_artifact(tiny_sd1, "vae_decoder", cache=c, progress=False)
    assert p1 == p2 and calls == ["vae_decoder"]
    assert "vae_decoder" in p1.parent.name and "dynamic-fp32" in p1.parent.name
    p1.write_bytes(p1.read_bytes()[:100])  # truncated on disk
    with pytest.warns(UserWarning, match="damaged"):
        p3 = artifacts.onnx_artifact(tiny_sd1, "vae_decoder", cache=c, progress=False)
    assert calls == ["vae_decoder", "vae_decoder"] and verify(p3.parent) is None


def test_the_cache_command_lists_and_clears(tmp_path, monkeypatch, capsys):
    from ldm_engine.__main__ import main

    monkeypatch.setenv("LDM_ENGINE_CACHE", str(tmp_path))
    c = ArtifactCache()
    c.get_or_build("onnx", "unet-aa-dynamic-fp32-rt", _build_counter([], b"x" * 2048))
    damaged = c.get_or_build("onnx", "vae_decoder-bb-dynamic-fp32-rt", _build_counter([]))
    (damaged / "model.onnx").write_bytes(b"")
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "2 artifacts" in out and "unet-aa-dynamic-fp32-rt" in out and "damaged" in out
    assert main(["cache", "--clear"]) == 0
    assert "freed" in capsys.readouterr().out
    assert c.entries() == [] and list((tmp_path / "onnx").iterdir()) == []
