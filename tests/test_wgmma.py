"""The Hopper GEMM (kernels_cuda/gemm_wgmma.cu, mpinfer/backend/cuda_wgmma.py) without a GPU:
its sm_90a cubin holds the instructions the design rests on (disassembled with nvdisasm),
and cuda_gemm.gemm() picks wgmma, mma.sync or gemv by device and shape, falls back when the
sm_90a build fails, plans tiles and encodes tensor maps as the kernel expects, with CuPy's
device, the launches and the driver replaced by recording stand-ins. The kernel's numbers
are checked on a GPU by bench/gpu/check_gemm.py."""

import ctypes
import glob
import importlib
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import mpinfer.backend
from mpinfer.backend import kernels

cuda_gemm = cuda_wgmma = None  # imported by _modules, over a CuPy stand-in where CuPy is missing


@pytest.fixture(autouse=True)
def _modules(monkeypatch):
    """cuda_gemm and cuda_wgmma import CuPy, which CI does not install: there they import a bare
    stand-in (the tests replace what the wrappers use of CuPy), undone after each test."""
    global cuda_gemm, cuda_wgmma
    try:
        import cupy  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
        for name in ("cuda_gemm", "cuda_wgmma"):
            monkeypatch.delitem(sys.modules, f"mpinfer.backend.{name}", raising=False)
            monkeypatch.delattr(mpinfer.backend, name, raising=False)
    cuda_gemm = importlib.import_module("mpinfer.backend.cuda_gemm")
    cuda_wgmma = importlib.import_module("mpinfer.backend.cuda_wgmma")
    for name, module in (("cuda_gemm", cuda_gemm), ("cuda_wgmma", cuda_wgmma)):
        monkeypatch.setattr(mpinfer.backend, name, module, raising=False)


def _nvdisasm():
    import nvidia  # the namespace of NVIDIA's wheels: nvidia-cuda-nvdisasm (the test extra) puts it in nvidia/cu*/bin

    tools = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "bin", "nvdisasm"))]
    assert tools, "nvdisasm not found: pip install nvidia-cuda-nvdisasm"
    return tools[0]


def test_wgmma_cubin_uses_tma_and_warpgroup_mma_without_spills(tmp_path):
    cubin = tmp_path / "gemm_wgmma.cubin"
    cubin.write_bytes(kernels.compile_cubin("gemm_wgmma", kernels.arch("gemm_wgmma", "90")))
    sass = subprocess.run([_nvdisasm(), str(cubin)], capture_output=True, text=True, check=True).stdout
    for needed in ("HGMMA.64x256x16.F32.BF16", "HGMMA.64x128x16.F32.BF16",  # wgmma, both tile widths
                   "UTMALDG.2D",  # the bulk tensor copies
                   "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"):  # setmaxnreg honoured (not dropped)
        assert needed in sass, needed
    assert not re.search(r"\b(LDL|STL)\b", sass), "local memory: the accumulators spilled"
    assert not re.search(r"\bHMMA\b", sass), "mma.sync code in the wgmma kernels"
    with pytest.raises(kernels.KernelError, match="gemm_wgmma.cu"):  # why kernels.ARCH_SPECIFIC lists it
        kernels.compile_cubin("gemm_wgmma", "sm_90")


class _Dev(np.ndarray):
    """A host array with a CuPy array's .data.ptr (the wrappers check alignment with it)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _bits(rows, cols):
    return np.zeros((rows, cols), np.uint16).view(_Dev)


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in GPU of compute capability state.cc with 132 SMs. Launches are recorded in
    state.launches as (file, kernel, grid, block, shared_mem, args); tensor maps as
    ("map", rows, K, box rows); state.build_error makes loading gemm_wgmma fail."""
    state = types.SimpleNamespace(cc="90", launches=[], build_error=None)
    monkeypatch.delenv("MPINFER_NO_WGMMA", raising=False)
    device = lambda: types.SimpleNamespace(compute_capability=state.cc,  # noqa: E731
                                           attributes={"MultiProcessorCount": 132})
    monkeypatch.setattr(cuda_wgmma, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(Device=device)))

    def function(name, kernel, smem=0):
        if name == "gemm_wgmma" and state.build_error:
            raise kernels.KernelError(state.build_error)
        return lambda grid, block, args, shared_mem=0: state.launches.append((name, kernel, grid, block, shared_mem,
                                                                               args))

    monkeypatch.setattr(kernels, "function", function)
    monkeypatch.setattr(cuda_wgmma, "tensor_map", lambda ptr, rows, K, box: ("map", rows, K, box))
    cuda_wgmma.available.cache_clear()
    cuda_wgmma.sms.cache_clear()
    yield state
    cuda_wgmma.available.cache_clear()
    cuda_wgmma.sms.cache_clear()


def test_hopper_prefill_runs_the_wgmma_kernel(gpu):
    assert cuda_gemm.prefill_path() == "wgmma"
    out = np.empty((17, 300), np.float32)
    cuda_gemm.gemm(_bits(17, 64), _bits(300, 64), out=out)
    [(name, kernel, grid, block, smem, args)] = gpu.launches
    assert (name, kernel, grid, block) == ("gemm_wgmma", "gemm_wgmma_128x128", (3, 1, 1), (384, 1, 1))
    assert args[:2] == (("map", 17, 64, 128), ("map", 300, 64, 128))  # A and W, boxes of 128 rows
    assert args[2] == cuda_gemm.null() and args[3] is out and args[4:] == (17, 300, 64)
    assert smem == cuda_wgmma.smem_bytes(128) <= 227 * 1024

    gpu.launches.clear()
    bias, out = np.zeros(4096, np.float32), np.empty((4096, 4096), np.float32)
    cuda_gemm.gemm(_bits(4096, 64), _bits(4096, 64), bias, out=out)
    [(_, kernel, grid, _, smem, args)] = gpu.launches
    assert (kernel, grid) == ("gemm_wgmma_128x256", (132, 1, 1))  # persistent: one block per SM
    assert args[1] == ("map", 4096, 64, 256) and args[2] is bias
    assert smem == cuda_wgmma.smem_bytes(256) <= 227 * 1024


def test_decode_rows_stay_on_the_gemv(gpu):
    cuda_gemm.gemm(_bits(16, 64), _bits(300, 64), out=np.empty((16, 300), np.float32))
    assert [launch[:2] for launch in gpu.launches] == [("gemv", "gemv_bf16")]


def test_other_gpus_run_mma_sync(gpu):
    gpu.cc = "80"
    assert cuda_gemm.prefill_path() == "mma.sync"
    cuda_gemm.gemm(_bits(17, 64), _bits(300, 64), out=np.empty((17, 300), np.float32))
    assert [launch[:2] for launch in gpu.launches] == [("gemm", "gemm_bf16_128x128")]


def test_no_wgmma_environment_keeps_hopper_on_mma_sync(gpu, monkeypatch):
    monkeypatch.setenv("MPINFER_NO_WGMMA", "1")  # what bench/gpu/check.py sets when the kernel fails its probe
    assert cuda_gemm.prefill_path() == "mma.sync"
    cuda_gemm.gemm(_bits(17, 64), _bits(300, 64), out=np.empty((17, 300), np.float32))
    assert [launch[0] for launch in gpu.launches] == ["gemm"]


def test_a_failed_sm90a_build_falls_back_with_one_line(gpu, capsys):
    gpu.build_error = "kernels_cuda/gemm_wgmma.cu: compiling failed (NVRTC_ERROR_COMPILATION):\nline 2\nline 3"
    for _ in range(2):
        cuda_gemm.gemm(_bits(17, 64), _bits(300, 64), out=np.empty((17, 300), np.float32))
    assert cuda_gemm.prefill_path() == "mma.sync"
    assert [launch[0] for launch in gpu.launches] == ["gemm", "gemm"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gemm_wgmma.cu (sm_90a) unavailable" in err and "NVRTC_ERROR_COMPILATION" in err


def test_swiglu_kernel_and_its_precondition(gpu):
    out = np.empty((1000, 1000), np.float32)
    cuda_wgmma.gemm(_bits(1000, 64), _bits(2000, 64), cuda_gemm.null(), out, swiglu=True)
    [(_, kernel, _, _, _, args)] = gpu.launches
    assert kernel == "gemm_wgmma_swiglu_128x128" and args[3] is out and args[4:] == (1000, 2000, 64)
    with pytest.raises(kernels.KernelError, match="N = 2001 is odd"):
        cuda_wgmma.gemm(_bits(1000, 64), _bits(2001, 64), cuda_gemm.null(), out, swiglu=True)
    with pytest.raises(kernels.KernelError, match=r"out must be \(1000, 1000\), got \(1000, 2000\)"):
        cuda_wgmma.gemm(_bits(1000, 64), _bits(2000, 64), cuda_gemm.null(), np.empty((1000, 2000), np.float32),
                        swiglu=True)


@pytest.mark.parametrize("M, N, plan", [
    (17, 300, (128, 3)),
    (1024, 1024, (128, 64)),  # 32 big tiles would leave 100 of 132 SMs idle
    (1000, 4100, (128, 264)),  # 136 big tiles: 2 waves of the long tile; 264 small ones: 2 of the short
    (2048, 2048, (256, 128)),
    (4096, 4096, (256, 512)),
    (4096, 14336, (256, 1792)),
    (8192, 8192, (256, 2048)),
])
def test_tile_plan(M, N, plan):
    assert cuda_wgmma.plan(M, N, 132) == plan


def test_tensor_map_encoding(monkeypatch):
    from cuda.bindings import driver as d

    blob = bytes(range(128))
    buf = ctypes.create_string_buffer(blob, 128)
    calls = []

    def encode(*args):
        calls.append(args)
        return d.CUresult.CUDA_SUCCESS, types.SimpleNamespace(getPtr=lambda: ctypes.addressof(buf))

    monkeypatch.setattr(d, "cuTensorMapEncodeTiled", encode)
    cuda_wgmma.tensor_map.cache_clear()
    try:
        got = cuda_wgmma.tensor_map(0x7F0000001000, 1000, 4104, 256)
        assert got.shape == (1,) and got.dtype.itemsize == 128 and got.tobytes() == blob  # CuPy: by value
        cuda_wgmma.tensor_map(0x7F0000001000, 1000, 4104, 256)
        [(dtype, rank, ptr, dims, strides, box, step, interleave, swizzle, l2, fill)] = calls  # cached
        assert (rank, ptr) == (2, 0x7F0000001000)
        assert [int(x) for x in dims] == [4104, 1000]  # {K, rows}: K innermost
        assert [int(x) for x in strides] == [2 * 4104]  # bytes between rows, a multiple of 16
        assert [int(x) for x in box] == [64, 256] and [int(x) for x in step] == [1, 1]
        assert dtype == d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        assert swizzle == d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B  # the kernel's descriptors assume it
        assert fill == d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE  # zeros past the edges
        assert interleave == d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE

        monkeypatch.setattr(d, "cuTensorMapEncodeTiled", lambda *a: (d.CUresult.CUDA_ERROR_INVALID_VALUE, None))
        with pytest.raises(kernels.KernelError, match="cuTensorMapEncodeTiled failed"):
            cuda_wgmma.tensor_map(0x7F0000001000, 1000, 4104, 128)
    finally:
        cuda_wgmma.tensor_map.cache_clear()
