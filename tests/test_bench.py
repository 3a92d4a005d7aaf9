"""ldm-bench: the rows it reports and the measurements behind them (not timings themselves)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ldm_engine.bench import CallTimer, configs_for, gemm_roofline, psnr, unet_gflop
from ldm_engine.models import get_preset

FIELDS = ["backend", "dtype", "arch", "res", "batch", "steps", "random_weights", "text_encoder_s", "unet_step_s",
          "sampler_overhead_s", "vae_decode_s", "end_to_end_s", "it_per_s", "peak_mem_mb", "unet_gflop_per_s",
          "roofline_pct"]


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
    assert configs_for("torch", "auto", "cpu") == [("torch", "fp32"), ("torch", "bf16")]
    assert configs_for("openvino,onnxruntime", "fp32", "cpu") == [("openvino", "fp32"), ("onnxruntime", "fp32")]
    assert ("tensorrt", "fp16") not in configs_for("all", "auto", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        configs_for("tvm", "auto", "cpu")


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


def test_ldm_bench_reports_every_field(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "rows.json"
    run = _bench(tmp_path, "--arch", "tiny-sd1", "--res", 32, "--steps", 3, "--backend", "torch,onnxruntime",
                 "--dtype", "fp32", "--warmup", 0, "--parity", "--json", out)
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["dtype"]) for r in rows] == [("torch", "fp32"), ("onnxruntime", "fp32")]
    for r in rows:
        assert all(r.get(k) is not None for k in FIELDS), r
        assert r["random_weights"] is True and r["steps"] == 3 and r["res"] == 32
        assert 0 < r["roofline_pct"] and r["unet_step_s"] > 0
    assert rows[0]["psnr_db"] is None  # the reference itself: bit-identical
    assert rows[1]["psnr_db"] >= 40
    assert [json.loads(line)["backend"] for line in run.stdout.splitlines()] == ["torch", "onnxruntime"]


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
