"""The machine under `ldm-bench`: CPU model, the instruction-set extensions that decide which precisions
run natively, and GEMM rooflines (the practical compute ceiling) in float dtypes and in int8.

Each roofline grows a square n x n x n product from 256 while one call still fits its time budget, so
a dtype that is emulated here (bf16 without AVX512_BF16/AMX: ~100x slower than fp32) costs about a
second instead of the tens of seconds one 2048^3 product would take.
"""
from __future__ import annotations

import platform
import time

import numpy as np
import torch

# the extensions that matter for diffusion inference, most capable first
ISA_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _cpuinfo() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C")."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def isa_flags() -> str:
    """The present ISA_FLAGS as a comma list ("avx512_bf16,avx512_vnni,avx512f,avx2"); without
    /proc/cpuinfo, torch's dispatch level in lower case ("avx2", "avx512", "default")."""
    flags = _cpuinfo().get("flags")
    if flags is None:
        return torch.backends.cpu.get_cpu_capability().lower()
    present = set(flags.split())
    return ",".join(f for f in ISA_FLAGS if f in present)


def has_native_bf16(isa: str) -> bool:
    return any(f in isa.split(",") for f in ("amx_bf16", "avx512_bf16"))


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _square_rate(make, n_max: int, repeat: int, budget_s: float, sync=lambda: None) -> float:
    """Ops/s (2 n^3 per call) of `make(n)()` at the largest n (256 doubling up to n_max) whose
    `repeat` calls fit budget_s, each size called once to warm it first. The fastest of the `repeat`
    calls counts: a ceiling is the best rate reached, and it stays put when other work shares the cores."""
    n = min(256, n_max)
    while True:
        fn = make(n)
        fn()  # warms caches, thread pools, compiled kernels
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        one = time.perf_counter() - t0
        if 2 * n > n_max or one * 8 * repeat > budget_s:  # the next size costs ~8x
            break
        n *= 2
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def gemm_roofline(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeat: int = 5,
                  budget_s: float = 3.0) -> float:
    """GFLOP/s of a square matmul in `dtype` (up to n x n x n) on this machine."""
    def make(size):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        return lambda: torch.matmul(a, b)

    return _square_rate(make, n, repeat, budget_s, lambda: _sync(device)) / 1e9


# ---- int8 -----------------------------------------------------------------------------------------
# Each maker returns `make(n) -> callable` after checking, on a small problem, that the runtime really
# multiplies int8 (exact int32 results, or an int8 kernel in the compiled graph); it raises otherwise.

def _exact(c: np.ndarray, a: np.ndarray, b: np.ndarray, rows: int = 8) -> bool:
    return np.array_equal(np.asarray(c)[:rows], a[:rows].astype(np.int64) @ b.astype(np.int64))


def _torch_int_mm(device: str = "cpu"):
    rng = np.random.default_rng(0)

    def ints(n):
        return torch.from_numpy(rng.integers(-128, 128, (n, n), dtype=np.int8)).to(device)

    def make(n):
        a, b = ints(n), ints(n)
        return lambda: torch._int_mm(a, b)

    a, b = ints(64), ints(64)
    if not _exact(torch._int_mm(a, b).cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()):
        raise RuntimeError("torch._int_mm gave inexact int32 results")
    return make


def _onnxruntime_matmul_integer():
    """ONNX Runtime's MatMulInteger, uint8 activations x int8 weights -> int32 (its quantized-model
    kernel). Activations stay in 0..127: AVX2 without VNNI sums u8 x s8 pairs in saturating int16, which
    ONNX Runtime's quantizer avoids the same way (reduce_range)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def session(n):
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm", [a, b], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def make(n):
        s, feeds = session(n), {"a": rng.integers(0, 128, (n, n), dtype=np.uint8),
                                "b": rng.integers(-128, 128, (n, n), dtype=np.int8)}
        return lambda: s.run(None, feeds)

    feeds = {"a": rng.integers(0, 128, (64, 64), dtype=np.uint8), "b": rng.integers(-128, 128, (64, 64), dtype=np.int8)}
    if not _exact(session(64).run(None, feeds)[0], feeds["a"], feeds["b"]):
        raise RuntimeError("MatMulInteger gave inexact int32 results")
    return make


def _openvino_int8_matmul():
    """OpenVINO's int8 MatMul: uint8 fake-quantized activations x int8 weights with a per-channel
    scale, which its low-precision transformations lower to a u8 x i8 kernel where the CPU has one."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    core = ov.Core()

    def compiled(n):
        x = ops.parameter([n, n], np.float32, name="a")
        hi = np.float32(2.55)
        xq = ops.fake_quantize(x, np.float32(0), hi, np.float32(0), hi, 256)  # u8 with scale 0.01
        w = ops.convert(ops.constant(rng.integers(-127, 128, (n, n), dtype=np.int8)), np.float32)
        w = ops.multiply(w, ops.constant(np.full((1, n), 0.01, np.float32)))
        model = ov.Model([ops.matmul(xq, w, False, False)], [x])
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def make(n):
        request = compiled(n).create_infer_request()
        a = (rng.integers(0, 256, (n, n)) * 0.01).astype(np.float32)
        return lambda: request.infer({0: a})

    runtime = compiled(64).get_runtime_model()
    precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ops()
                  if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul")}
    if not precisions & {"u8", "i8"}:
        raise RuntimeError(f"its MatMul runs in {', '.join(sorted(precisions)) or 'an unknown precision'}, not int8")
    return make


INT8_GEMMS = {"torch._int_mm": _torch_int_mm, "onnxruntime MatMulInteger": _onnxruntime_matmul_integer,
              "openvino int8 MatMul": _openvino_int8_matmul}


def int8_gemm_roofline(device: str = "cpu", n: int = 2048, repeat: int = 5,
                       budget_s: float = 1.5) -> tuple[float | None, str]:
    """(GOP/s, runtime) of the fastest runtime here that multiplies int8 matrices natively (int32
    accumulation; up to n x n x n), or (None, why none did). torch's CPU int8 matmul is a plain loop on
    many CPUs, so every runtime found is measured and the fastest is the ceiling; on CUDA, torch._int_mm."""
    cuda = str(device).startswith("cuda")
    gemms = {"torch._int_mm": lambda: _torch_int_mm(device)} if cuda else INT8_GEMMS
    rates, failures = {}, []
    for name, prepare in gemms.items():
        try:
            rates[name] = _square_rate(prepare(), n, repeat, budget_s, lambda: _sync(device)) / 1e9
        except ImportError as e:
            failures.append(f"{name}: {e.name or 'its runtime'} not installed")
        except Exception as e:  # a runtime without the kernel on this machine: reported, never fatal
            failures.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if not rates:
        return None, "; ".join(failures)
    best = max(rates, key=rates.get)
    return rates[best], best
