"""ldm-bench: the rows it reports and the measurements behind them (not timings themselves)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ldm_engine import bench, bench_backends, bench_machine
from ldm_engine.bench import CallTimer, configs_for, gemm_roofline, psnr, unet_gflop
from ldm_engine.bench_progress import table
from ldm_engine.models import get_preset

FIELDS = ["backend", "dtype", "arch", "res", "batch", "steps", "random_weights", "text_encoder_s", "unet_step_s",
          "sampler_overhead_s", "vae_decode_s", "end_to_end_s", "it_per_s", "peak_mem_mb", "unet_gflop_per_s",
          "roofline_pct", "cpu", "isa"]
MACHINE_FIELDS = ["cpu", "isa", "int8_gemm_gflops", "int8_gemm_by", "cache_interval"]


def test_unet_flops_scale_with_pixels_and_batch():
    cfg = get_preset("sd-1.5")
    base = unet_gflop(cfg, 1, 256)
    # SD-1.5 at 256x256 with the CFG pair: about 0.36 TFLOP (multiply and add counted) per UNet call
    assert 300 < base < 420
    assert 3.5 < unet_gflop(cfg, 1, 512) / base < 4.8  # attention grows faster than the convolutions
    assert unet_gflop(cfg, 2, 256) == pytest.approx(2 * base, rel=1e-6)


def test_roofline_and_psnr():
    assert gemm_roofline(torch.float32, n=256, repeat=2) > 0
    a = np.zeros((2, 4, 4, 3))
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)


def test_config_selection():
    assert configs_for("torch", "auto", "cpu") == ([("torch", "fp32"), ("torch", "bf16")], [])
    assert configs_for("openvino,onnxruntime", "fp32", "cpu")[0] == [("openvino", "fp32"), ("onnxruntime", "fp32")]
    assert ("tensorrt", "fp16") not in configs_for("all", "auto", "cpu")[0]
    with pytest.raises(ValueError, match="unknown backend"):
        configs_for("tvm", "auto", "cpu")


def test_int8_runs_on_openvino_only(monkeypatch):
    monkeypatch.setattr(bench_backends, "unusable_reason", lambda name, device: None)
    configs, skipped = configs_for("all", "int8", "cpu")
    assert configs == [("openvino", "int8")]
    assert "torch: skipped (--dtype int8 runs on openvino only)" in skipped
    with pytest.raises(ValueError, match="--dtype int8 runs on openvino only"):
        configs_for("torch,openvino", "int8", "cpu")


def test_bf16_is_left_out_where_the_cpu_emulates_it():
    configs, skipped = configs_for("torch,openvino", "auto", "cpu", native_bf16=False)
    assert configs == [("torch", "fp32"), ("openvino", "fp32")]
    assert [s.split(":")[0] for s in skipped] == ["torch bf16", "openvino bf16"]
    assert all("no bf16 instructions" in s for s in skipped)
    assert configs_for("torch", "bf16", "cpu", native_bf16=False)[0] == [("torch", "bf16")]  # asked for: runs


def _without(monkeypatch, *modules):
    """find_spec as if `modules` were not installed, and no CUDA device."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_default_backends_skip_the_unusable_ones_with_their_reason(monkeypatch):
    _without(monkeypatch, "openvino")
    configs, skipped = configs_for("all", "auto", "cpu")
    assert {b for b, _ in configs} <= {"torch", "onnxruntime"} and ("torch", "fp32") in configs
    assert "openvino: skipped (openvino not installed: pip install 'ldm_engine[openvino]')" in skipped
    assert "tensorrt: skipped (no CUDA device)" in skipped
    _without(monkeypatch, "openvino", "onnxruntime")
    assert configs_for("all", "fp32", "cpu")[0] == [("torch", "fp32")]


def test_quick_runs_each_backend_once_in_its_default_precision(monkeypatch):
    monkeypatch.setattr(bench_backends, "unusable_reason", lambda name, device: None)
    assert configs_for("torch,onnxruntime,openvino", "auto", "cpu", quick=True)[0] == [
        ("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "auto")]
    assert configs_for("torch", "bf16", "cpu", quick=True)[0] == [("torch", "bf16")]


def test_an_unusable_backend_asked_for_stops_before_any_work(monkeypatch, capsys):
    _without(monkeypatch, "openvino")

    def no_work(*a, **k):
        raise AssertionError("work started")

    import ldm_engine.loading

    monkeypatch.setattr(ldm_engine.loading, "random_model", no_work)
    monkeypatch.setattr(bench, "gemm_roofline", no_work)
    assert bench.main(["--arch", "tiny-sd1", "--backend", "torch,openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --backend openvino cannot run here: openvino not installed: "
                   "pip install 'ldm_engine[openvino]'")
    assert bench.main(["--arch", "tiny-sd1", "--backend", "tensorrt", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --backend tensorrt cannot run here: no CUDA device"


def test_quick_defaults_and_explicit_values(monkeypatch, capsys):
    """--quick: one configuration per backend at 256x256 and 4 steps after one 2-step warm-up, unless
    --res / --steps are given (bench_config recorded instead of run)."""
    monkeypatch.setattr(bench_backends, "unusable_reason", lambda name, device: None)
    calls = []

    def fake_config(model, backend, dtype, res, batch, steps, warmup, repeat, *a, **k):
        calls.append((backend, dtype, res, steps, warmup, repeat))
        return {"backend": backend, "dtype": dtype, "unet_step_s": 0.5}, np.zeros((1, 8, 8, 3))

    monkeypatch.setattr(bench, "bench_config", fake_config)
    monkeypatch.setattr(bench, "gemm_roofline", lambda *a, **k: 100.0)
    monkeypatch.setattr(bench, "int8_gemm_roofline", lambda *a, **k: (None, "none here"))
    assert bench.main(["--arch", "tiny-sd1", "--quick", "--backend", "torch,onnxruntime"]) == 0
    assert calls == [("torch", "fp32", 256, 4, 1, 1), ("onnxruntime", "fp32", 256, 4, 1, 1)]
    out, err = capsys.readouterr()
    assert "plan: torch fp32: 1 warm-up x 2 + 1 timed x 4 steps = 6 steps" in err
    assert "plan: 2 configurations x 6 = 12 denoising steps" in err
    assert err.count("none here") == 1  # the reason no int8 GEMM was measured, said once
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(r["int8_gemm_gflops"] is None and r["cache_interval"] is None for r in rows)
    calls.clear()
    assert bench.main(["--arch", "tiny-sd1", "--quick", "--backend", "torch", "--res", "64", "--steps", "3"]) == 0
    assert calls == [("torch", "fp32", 64, 3, 1, 1)]


def test_machine_fields():
    assert isinstance(bench_machine.cpu_name(), str) and bench_machine.cpu_name()
    isa = bench_machine.isa_flags()
    assert isinstance(isa, str) and " " not in isa
    if os.path.exists("/proc/cpuinfo"):
        assert all(f in bench_machine.ISA_FLAGS for f in isa.split(",") if f)
    assert bench_machine.has_native_bf16("avx512_bf16,avx512f,avx2") and not bench_machine.has_native_bf16("avx2")
    rate, by = bench_machine.int8_gemm_roofline(n=512, repeat=2, budget_s=0.3)
    assert (rate > 0 and by in bench_machine.INT8_GEMMS) or (rate is None and by)


def test_int8_roofline_says_why_when_nothing_runs_int8(monkeypatch):
    def broken():
        raise RuntimeError("no int8 kernel")

    def absent():
        raise ImportError("absent", name="someruntime")

    monkeypatch.setattr(bench_machine, "INT8_GEMMS", {"a": broken, "b": absent})
    assert bench_machine.int8_gemm_roofline() == (None, "a: no int8 kernel; b: someruntime not installed")


def test_torch_int_mm_is_checked_exact():
    make = bench_machine._torch_int_mm()  # raises where torch's int8 matmul is inexact
    make(256)()


def test_emulated_bf16_roofline_takes_seconds():
    t0 = time.perf_counter()
    assert gemm_roofline(torch.bfloat16, budget_s=1.0) > 0
    assert time.perf_counter() - t0 < 10  # a 2048^3 bf16 product alone takes ~15 s where bf16 is emulated


def test_table_has_a_column_per_field():
    rows = [{"backend": "torch", "dtype": "fp32", "unet_step_s": 0.51234, "cpu": "AMD EPYC", "isa": "avx2",
             "int8_gemm_gflops": None, "cache_interval": None}]
    header, line = table(rows).splitlines()
    assert header.split() == ["backend", "dtype", "unet_step_s", "cpu", "isa", "int8_gemm_gflops", "cache_interval"]
    assert line.split() == ["torch", "fp32", "0.5123", "AMD", "EPYC", "avx2", "-", "-"]


def test_call_timer_records_each_call():
    class Fake:
        def encode_text(self, x):
            return x

        def denoise(self, x):
            return x

        def decode(self, x):
            return x

    f = Fake()
    t = CallTimer(f)
    for _ in range(3):
        f.denoise(1)
    assert len(t.durations("denoise")) == 3 and t.durations("decode") == []


def _bench(tmp_path, *args):
    """ldm-bench in a subprocess, run outside the source tree (`python -m` puts the working directory
    first on sys.path, which would import the uninstalled sources)."""
    return subprocess.run([sys.executable, "-m", "ldm_engine.bench", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path)


def test_ldm_bench_quick_reports_every_field_with_its_plan_and_progress(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "rows.json"
    run = _bench(tmp_path, "--arch", "tiny-sd1", "--quick", "--res", 16, "--steps", 2, "--backend",
                 "torch,onnxruntime", "--parity", "--json", out)
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["dtype"]) for r in rows] == [("torch", "fp32"), ("onnxruntime", "fp32")]  # one each
    for r in rows:
        assert all(r.get(k) is not None for k in FIELDS), r
        assert r["random_weights"] is True and r["steps"] == 2 and r["res"] == 16
        assert 0 < r["roofline_pct"] and r["unet_step_s"] > 0
    assert rows[0]["psnr_db"] is None  # the reference itself: bit-identical
    assert rows[1]["psnr_db"] >= 40
    assert [json.loads(line)["backend"] for line in run.stdout.splitlines()] == ["torch", "onnxruntime"]
    _check_machine_fields(rows)
    err = run.stderr
    assert "plan: torch fp32: 1 warm-up x 2 + 1 timed x 2 steps = 4 steps" in err
    assert "plan: 2 configurations x 4 = 8 denoising steps" in err
    assert "torch fp32: 100%" in err and "4/4 steps" in err and "onnxruntime fp32: 100%" in err  # the bars
    assert err.count("estimate: ") == 1 and "steps left" in err
    assert "int8_gemm_gflops" in err and "cache_interval" in err  # the table


def _check_machine_fields(rows):
    for r in rows:
        assert isinstance(r["cpu"], str) and r["cpu"] and isinstance(r["isa"], str)
        assert (isinstance(r["int8_gemm_gflops"], float) and r["int8_gemm_gflops"] > 0
                and r["int8_gemm_by"] in bench_machine.INT8_GEMMS) or (r["int8_gemm_gflops"] is None
                                                                        and r["int8_gemm_by"] is None)
        assert r["cache_interval"] is None and set(MACHINE_FIELDS) <= set(r)


def test_ldm_bench_refuses_bad_arguments(tmp_path):
    run = _bench(tmp_path, "--arch", "tiny-sd1", "--res", 30)
    assert run.returncode == 2 and "multiple of 4" in run.stderr and "Traceback" not in run.stderr
    run = _bench(tmp_path, "--arch", "nope")
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_ldm_bench_controlnet_adds_the_step_with_a_controlnet(tmp_path):
    pytest.importorskip("onnxruntime")
    from ldm_engine.bench_control import CONTROL_FIELDS

    out = tmp_path / "rows.json"
    run = _bench(tmp_path, "--arch", "tiny-sd1", "--res", 16, "--steps", 2, "--backend", "torch,onnxruntime",
                 "--dtype", "fp32", "--warmup", 0, "--controlnet", "--json", out)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert all(r[k] > 0 for k in CONTROL_FIELDS), r
        assert r["control_step_s"] == pytest.approx(r["controlnet_s"] + r["control_unet_step_s"], abs=2e-4)
        assert r["control_cost_x"] == pytest.approx(r["control_step_s"] / r["unet_step_s"], rel=0.15)  # both rounded to 1e-4 s


def test_ldm_bench_cache_interval_times_the_cached_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    from ldm_engine.bench_cache import CACHE_FIELDS

    out = tmp_path / "rows.json"
    run = _bench(tmp_path, "--arch", "tiny-sd1", "--res", 16, "--steps", 4, "--backend", "torch,onnxruntime",
                 "--dtype", "fp32", "--warmup", 1, "--cache-interval", 2, "--json", out)
    assert run.returncode == 0, run.stderr
    assert "plan: torch fp32: 1 warm-up x 2 + 1 timed x 4 steps (x2 with the step cache) = 12 steps" in run.stderr
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert r["cache_interval"] == 2 and all(r[k] is not None and r[k] > 0 for k in CACHE_FIELDS), r
        assert r["cache_speedup_x"] == pytest.approx(r["end_to_end_s"] / r["cache_end_to_end_s"], rel=0.05)
    assert _bench(tmp_path, "--arch", "tiny-sd1", "--cache-interval", 0).returncode == 2
