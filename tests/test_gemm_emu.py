"""The linear-layer kernels (kernels_cuda/gemm.cu, gemv.cu) run on the CPU through
tests/cuda_emu.py (g++ against an emulation of the CUDA built-ins) behind the real wrapper
mpinfer/backend/cuda_gemm.py: which kernels it launches, with which grid and arguments, and
what they write, plain and with the SwiGLU epilogue, against the NumPy backend on the same
bf16 inputs. The plain kernels were checked on an H200 (bench/gpu/NOTES.md), so their
passing here also checks the emulation; bench/gpu/check_gemm.py checks both on a GPU.

SMS (the multiprocessor count the wrapper sizes grids for) is lowered to 4 in some cases so
that small shapes reach the wide-N kernels and the 128x256 tiles."""

import importlib
import sys
import types

import numpy as np
import pytest

import cuda_emu
from fake_gpu import bf16_bits, f32
from mpinfer.backend import kernels
from mpinfer.backend.numpy_backend import NumpyBackend

CASES = [  # (SMS, M, N, K, bias, kernels launched without SwiGLU)
    (132, 130, 264, 200, True, ["gemm_bf16_128x128"]),  # 2 x 3 tiles, ragged M, N and K
    (4, 130, 264, 200, False, ["gemm_bf16_128x256"]),
    (4, 17, 520, 72, True, ["gemm_bf16_128x256"]),  # one row past the gemv; K tail
    (132, 3, 74, 600, True, ["gemv_bf16", "gemv_reduce"]),  # split K: 3 ranges of 256
    (132, 16, 130, 1032, False, ["gemv_bf16", "gemv_reduce"]),  # 5 ranges, ragged last one
    (132, 5, 300, 96, True, ["gemv_bf16"]),
    (4, 16, 300, 96, True, ["gemv_bf16_k2_u2"]),
    (4, 1, 300, 1032, True, ["gemv_bf16_k2"]),
]


@pytest.fixture
def cuda_gemm(monkeypatch):
    """mpinfer.backend.cuda_gemm over a CuPy stand-in, its kernels on the emulation."""
    cupy = types.ModuleType("cupy")
    cupy.empty = lambda shape, dtype: cuda_emu.device(np.empty(shape, dtype))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.delitem(sys.modules, "mpinfer.backend.cuda_gemm", raising=False)
    monkeypatch.delattr(sys.modules["mpinfer.backend"], "cuda_gemm", raising=False)
    monkeypatch.setattr(kernels, "function", cuda_emu.function)
    cuda_emu.Kernel.launches.clear()
    module = importlib.import_module("mpinfer.backend.cuda_gemm")
    monkeypatch.setattr(module.cuda_wgmma, "available", lambda: False)  # the emulation runs mma.sync, not wgmma
    return module


def _inputs(rng, M, N, K, bias):
    a = bf16_bits(rng.standard_normal((M, K)))
    w = bf16_bits(rng.standard_normal((N, K)) * K**-0.5)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    return a, w, b


def _rel_err(out, ref):
    return np.inf if not np.isfinite(out).all() else float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _run(cuda_gemm, a, w, b, swiglu):
    """gemm into a NaN-poisoned output (M, N or N/2) followed by a poisoned guard row."""
    M, N = len(a), len(w)
    buf = cuda_emu.device(np.full((M + 1, N // 2 if swiglu else N), np.nan, np.float32))
    out = cuda_gemm.gemm(cuda_emu.device(a), cuda_emu.device(w), None if b is None else cuda_emu.device(b),
                         out=buf[:M], swiglu=swiglu)
    assert out is not None and np.isnan(buf[M]).all(), "written past the output"
    return np.array(buf[:M])


@pytest.mark.parametrize("sms, M, N, K, bias, launched", CASES)
def test_plain_kernels_on_the_emulation(cuda_gemm, monkeypatch, sms, M, N, K, bias, launched):
    monkeypatch.setattr(cuda_gemm, "SMS", sms)
    a, w, b = _inputs(np.random.default_rng(M * N), M, N, K, bias)
    out = _run(cuda_gemm, a, w, b, swiglu=False)
    assert [k for k, _, _ in cuda_emu.Kernel.launches] == launched
    assert _rel_err(out, NumpyBackend(threads=1).linear(f32(a), f32(w), b)) < 1e-5


@pytest.mark.parametrize("sms, M, N, K, bias, launched", CASES)
def test_swiglu_epilogue_on_the_emulation(cuda_gemm, monkeypatch, sms, M, N, K, bias, launched):
    """gate/up rows interleaved (2i gate_i, 2i + 1 up_i) -> silu(gate) * up (M, N/2), equal to
    the NumPy backend's swiglu_linear on the same rows stacked [gate; up]; split K applies the
    activation after the reduction (gemv_reduce_swiglu)."""
    monkeypatch.setattr(cuda_gemm, "SMS", sms)
    a, w, b = _inputs(np.random.default_rng(M * N + 1), M, N, K, bias)
    out = _run(cuda_gemm, a, w, b, swiglu=True)
    split = launched[-1] == "gemv_reduce"  # the plain kernel's partials, then the SwiGLU reduction
    want = [launched[0], "gemv_reduce_swiglu"] if split else [launched[0] + "_swiglu"]
    assert [k for k, _, _ in cuda_emu.Kernel.launches] == want
    gate, up = w[0::2], w[1::2]
    ref = NumpyBackend(threads=1).swiglu_linear(f32(a), f32(np.concatenate([gate, up])),
                                                None if b is None else np.concatenate([b[0::2], b[1::2]]))
    assert _rel_err(out, ref) < 1e-5


def test_swiglu_needs_even_rows(cuda_gemm):
    a, w, _ = _inputs(np.random.default_rng(0), 2, 75, 64, False)
    with pytest.raises(kernels.KernelError, match="even number of weight rows"):
        cuda_gemm.gemm(cuda_emu.device(a), cuda_emu.device(w), swiglu=True)
    a, w, _ = _inputs(np.random.default_rng(0), 2, 74, 64, False)
    with pytest.raises(kernels.KernelError, match=r"out must be C-contiguous float32 \(2, 37\)"):
        cuda_gemm.gemm(cuda_emu.device(a), cuda_emu.device(w), out=cuda_emu.device(np.empty((2, 74), np.float32)),
                       swiglu=True)


# Planted defects: each edit of a kernel file must make the checks above fail.
MUTANTS = [
    ("gemm", "v0 / (1.0f + expf(-v0)) * v1", "v1 / (1.0f + expf(-v1)) * v0", (132, 130, 264, 200)),  # up as gate
    ("gemm", "(col >> 1)] = v0", "(col >> 1) ^ 1] = v0", (132, 130, 264, 200)),  # pairs stored swapped
    ("gemv", "total(en, ei + 32)", "total(en, ei + 64)", (132, 5, 300, 96)),  # up from the row 8 below
    ("gemv", "const int MN = 2 * MI, p = 2 * i,", "const int MN = 2 * MI, p = 2 * i + 1,", (132, 3, 74, 600)),
]


@pytest.mark.parametrize("name, old, new, shape", MUTANTS)
def test_a_planted_epilogue_defect_fails(cuda_gemm, monkeypatch, tmp_path, name, old, new, shape):
    text = (cuda_emu.KERNELS / f"{name}.cu").read_text()
    assert text.count(old) == 1
    (tmp_path / f"{name}.cu").write_text(text.replace(old, new))
    monkeypatch.setattr(cuda_emu, "KERNELS", tmp_path)
    sms, M, N, K = shape
    monkeypatch.setattr(cuda_gemm, "SMS", sms)
    a, w, b = _inputs(np.random.default_rng(1), M, N, K, True)
    out = _run(cuda_gemm, a, w, b, swiglu=True)
    y = f32(a) @ f32(w).T + b
    assert _rel_err(out, y[:, 0::2] / (1 + np.exp(-y[:, 0::2])) * y[:, 1::2]) > 1e-2
