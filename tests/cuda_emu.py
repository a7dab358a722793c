"""kernels_cuda/*.cu run on the CPU: a kernel file compiled with g++ against an emulation of
its header and of the CUDA built-ins (tests/cuda_emu/common.cuh: a block's threads as fibers,
mma.sync / ldmatrix from the PTX ISA's fragment tables), launched the way CuPy launches it.
For the kernels' indexing and epilogues where no GPU is at hand; numbers agree with the
tensor cores' up to float32 rounding (the k order of a sum differs).

    f = cuda_emu.function("gemm", "gemm_bf16_128x128_swiglu")   # as kernels.function
    f(grid, block, (a, w, bias, out, np.int32(M), ...), shared_mem=smem)

Arrays are DeviceArray (numpy with CuPy's .data.ptr); np.uint64 arguments are pointers
(cuda_gemm.null()). A file's inline PTX helpers other than common.cuh's need an entry in
REPLACE; the build fails naming the helper otherwise.
"""

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "kernels_cuda"
EMU = HERE / "cuda_emu" / "common.cuh"

# inline-PTX helpers of kernel files -> host bodies
REPLACE = {
    "ld_stream": "u32x4 r; std::memcpy(&r, p, 16); return r;",
    "ld_cached": "u32x4 r; std::memcpy(&r, p, 16); return r;",
}


class DeviceArray(np.ndarray):
    """A host array standing in for a cupy one: .data.ptr is its address."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def device(x):
    return np.ascontiguousarray(x).view(DeviceArray)


def _body_end(text, start):
    """Index just past the brace that closes the one opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced braces")


def source(name):
    """kernels_cuda/{name}.cu rewritten for the host, with a C launch stub per kernel."""
    text = (KERNELS / f"{name}.cu").read_text()
    text = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];",
                  r"unsigned char* \1 = emu::S.dynamic_smem.data();", text)
    for helper, body in REPLACE.items():
        m = re.search(rf"\b{helper}\([^)]*\)\s*{{", text)
        if m:
            text = text[: m.end() - 1] + "{ " + body + " }" + text[_body_end(text, m.end() - 1):]
    left = re.search(r"\basm\b", text)
    if left:
        line = text[: left.start()].count("\n") + 1
        raise ValueError(f"{name}.cu line {line}: inline PTX without an emulation (add its helper to REPLACE)")
    stubs = []
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)', text):
        kernel, params = m.group(1), [p.strip() for p in m.group(2).split(",")]
        types_ = [re.sub(r"\s*\b__restrict__\b", "", p.rsplit(None, 1)[0]).strip() for p in params]
        args = ", ".join(f"*({t}*)args[{i}]" for i, t in enumerate(types_))
        stubs.append(f'extern "C" long emu_{kernel}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                     f"unsigned bz, size_t smem, void** args) {{\n"
                     f"    return emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, smem, [=] {{ {kernel}({args}); }});\n}}")
    return text + "\n" + "\n".join(stubs) + "\n"


_loaded = {}


def library(name):
    """The g++ build of kernels_cuda/{name}.cu (KERNELS), kept by the hash of its sources."""
    text = source(name)
    key = hashlib.sha256((text + EMU.read_text()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "mpinfer-cuda-emu"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{name}-{key}.so"
    if not lib.exists():
        work = Path(tempfile.mkdtemp(dir=folder))
        (work / "common.cuh").write_text(EMU.read_text())
        (work / f"{name}.cpp").write_text(text)
        done = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-o",
                               str(work / "lib.so"), str(work / f"{name}.cpp")], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ {name}.cu:\n{done.stderr[-4000:]}")
        (work / "lib.so").replace(lib)
        shutil.rmtree(work)
    if lib not in _loaded:
        _loaded[lib] = ctypes.CDLL(str(lib))
    return _loaded[lib]


_SCALARS = {np.dtype(np.uint64): ctypes.c_void_p, np.dtype(np.int32): ctypes.c_int32,
            np.dtype(np.int64): ctypes.c_int64, np.dtype(np.float32): ctypes.c_float}


def _arg(x):
    """A launch argument as the C value it stands for: arrays by address, np.uint64 a pointer."""
    if isinstance(x, np.ndarray):
        return ctypes.c_void_p(x.ctypes.data)
    dtype = np.asarray(x).dtype
    return _SCALARS[dtype](float(x) if dtype.kind == "f" else int(x))


class Kernel:
    """One extern "C" kernel; called as a cupy RawModule function. launches: [(kernel, grid, block)]."""

    launches = []

    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel
        self.fn = getattr(library(name), f"emu_{kernel}")
        self.fn.restype = ctypes.c_long

    def __call__(self, grid, block, args, shared_mem=0):
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        Kernel.launches.append((self.kernel, grid, block))
        values = [_arg(a) for a in args]
        ptrs = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        stuck = self.fn(*map(int, grid), *map(int, block), ctypes.c_size_t(shared_mem), ptrs)
        if stuck:
            raise RuntimeError(f"{self.kernel}: block {stuck - 1} (linear) deadlocked at a barrier")


def function(name, kernel, smem=0):
    """As mpinfer.backend.kernels.function, on the emulation."""
    return Kernel(name, kernel)
