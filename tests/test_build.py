"""The native extension builds and works; build_info reports the installation."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import ldm_engine
from ldm_engine import _C


def test_guidance_combine_matches_numpy():
    rng = np.random.default_rng(0)
    u, c = rng.standard_normal((2, 4, 5, 7), dtype=np.float32), rng.standard_normal((2, 4, 5, 7), dtype=np.float32)
    out = _C.guidance_combine(u, c, 7.5)
    np.testing.assert_allclose(out, u + 7.5 * (c - u), rtol=1e-6, atol=1e-6)
    assert out.shape == u.shape and out.dtype == np.float32


def test_guidance_combine_takes_torch_tensors_zero_copy():
    u, c = torch.randn(3, 4), torch.randn(3, 4)
    out = torch.from_numpy(_C.guidance_combine(u.numpy(), c.numpy(), 2.0))
    torch.testing.assert_close(out, u + 2.0 * (c - u))


def test_guidance_combine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        _C.guidance_combine(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), 1.0)


def test_build_info_fields():
    info = ldm_engine.build_info()
    assert info["ldm_engine"] == ldm_engine.__version__
    assert info["torch"] == torch.__version__
    assert info["native_extension"] is True
    assert info["native_cuda_compiled"] is _C.cuda_compiled()
    for key in ("torch_device", "cuda_device", "triton", "onnx", "onnxruntime", "openvino", "tensorrt"):
        assert key in info


def test_info_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "ldm_engine", "info", "--json"], capture_output=True, text=True,
                         check=True, cwd="/")
    assert '"native_extension": true' in out.stdout
