"""The parts of the CUDA-graph loop that need no GPU: bucket keys, the device coefficient table, and a
clear refusal where no CUDA device or CUDA build exists."""
import numpy as np
import pytest
import torch

from ldm_engine import _C
from ldm_engine.models.configs import ScheduleConfig
from ldm_engine.sampling import make_plan
from ldm_engine.sampling.cuda_graph import CudaGraphLoop, bucket_key, step_table

F = np.float32


def test_bucket_keys_separate_what_changes_the_graph():
    base = bucket_key("ddim", (2, 4, 64, 64), 20, True, "eps")
    assert base == bucket_key("ddim", torch.Size([2, 4, 64, 64]), 20, True, "eps")
    for other in (bucket_key("ddim", (2, 4, 64, 96), 20, True, "eps"), bucket_key("ddim", (2, 4, 64, 64), 30, True, "eps"),
                  bucket_key("ddim", (2, 4, 64, 64), 20, False, "eps"), bucket_key("euler", (2, 4, 64, 64), 20, True, "eps"),
                  bucket_key("ddim", (2, 4, 64, 64), 20, True, "v")):
        assert other != base
    assert bucket_key("dpmpp_2m_karras", (1, 4, 8, 8), 5, True, "v")[0] == bucket_key("dpmpp_2m", (1, 4, 8, 8), 5, True, "v")[0]
    with pytest.raises(ValueError, match="CUDA graphs support"):
        bucket_key("plms", (1, 4, 8, 8), 5, True, "eps")
    with pytest.raises(ValueError, match="eps and v"):
        bucket_key("ddim", (1, 4, 8, 8), 5, True, "x0")


def test_ddim_table_holds_the_step_scalars():
    plan = make_plan("ddim", 10, ScheduleConfig())
    table = step_table("ddim", plan, eta=0.0)
    assert table.shape == (10, 16) and table.dtype == np.float32
    for i, t in enumerate(plan.timesteps):
        a, a_prev = plan.abar(int(t)), plan.abar(int(t) - plan.step_stride)
        assert table[i, 0] == F(np.sqrt(a)) and table[i, 1] == F(np.sqrt(1 - a))  # a, s
        assert table[i, 2] == F(np.sqrt(a_prev)) and table[i, 4] == 0  # c_x0, no noise at eta 0


def test_euler_and_dpm_tables():
    plan = make_plan("euler", 6, ScheduleConfig())
    table = step_table("euler", plan)
    sig = plan.sigmas.astype(np.float64)
    np.testing.assert_array_equal(table[:, 5], sig[:-1].astype(F))  # sigma
    np.testing.assert_array_equal(table[:, 14], np.sqrt(sig[:-1] ** 2 + 1).astype(F))  # in_scale
    dpm = step_table("dpmpp_2m", make_plan("dpmpp_2m", 6, ScheduleConfig()))
    assert dpm[0, 13] == 0 and dpm[-1, 13] == 0 and (dpm[1:-1, 13] == 1).all()  # second order in between


def test_graph_loop_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        CudaGraphLoop()


def test_build_reports_cuda_part():
    assert _C.cuda_compiled() == hasattr(_C, "cuda")


def test_input_signature_separates_context_lengths_and_extra_inputs():
    from ldm_engine.sampling.cuda_graph import input_signature

    ctx = {"context": torch.zeros(2, 77, 768), "concat": None}
    assert input_signature(ctx) == input_signature({"concat": None, "context": torch.ones(2, 77, 768)})
    assert input_signature(ctx) != input_signature({"context": torch.zeros(2, 154, 768), "concat": None})
    assert input_signature(ctx) != input_signature({**ctx, "concat": torch.zeros(1, 5, 8, 8)})
    assert input_signature(ctx) != input_signature({"context": torch.zeros(2, 77, 768, dtype=torch.float16), "concat": None})
