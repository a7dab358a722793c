"""Compiling and loading the CUDA kernels of kernels_cuda/.

Every .cu file compiles with NVRTC to a cubin for the device's architecture (sm_90 on
H100/H200; sm_90a for the files in ARCH_SPECIFIC, which use Hopper-only instructions),
once per process and once per cache folder: the cubin is kept under
`cache_dir()` by a hash of the sources, options and NVRTC version, so the ranks of a node
compile each file once between them (written to a temporary name, then renamed, so a
reader never sees half a file). CI compiles the same way without a GPU (cubin, not PTX:
only the cubin step runs ptxas, which rejects bad inline PTX).

The kernels include no CUDA headers (CI's NVRTC has none on its search path): bf16 is
carried as raw 16-bit integers, see kernels_cuda/common.cuh.
"""

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

KERNELS = Path(__file__).resolve().parents[2] / "kernels_cuda"
OPTIONS = ("-std=c++17", "--use_fast_math")
# files built for the architecture-specific target (sm_90a: wgmma, setmaxnreg), which runs
# only on that exact compute capability; the wrappers use them only there (cuda_wgmma.py)
ARCH_SPECIFIC = {"gemm_wgmma"}


class KernelError(UserError):
    """A kernel file that does not compile, or a wrapper's precondition that does not hold."""


def cache_dir():
    """Where cubins are kept: $MPINFER_KERNEL_CACHE (point it at node-local disk on a
    cluster, e.g. /tmp or $SLURM_TMPDIR), else ~/.cache/mpinfer/kernels."""
    return Path(os.environ.get("MPINFER_KERNEL_CACHE") or Path.home() / ".cache" / "mpinfer" / "kernels")


def names():
    """The kernel files, without .cu."""
    return sorted(p.stem for p in KERNELS.glob("*.cu"))


def arch(name, compute_capability):
    """The NVRTC -arch of kernels_cuda/{name}.cu on a device of this compute capability ("90")."""
    return f"sm_{compute_capability}" + ("a" if name in ARCH_SPECIFIC else "")


def _nvrtc():
    from cuda.bindings import nvrtc

    return nvrtc


def _check(result, what, prog=None, name=""):
    nvrtc = _nvrtc()
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace").rstrip("\x00").strip()
        raise KernelError(f"kernels_cuda/{name}.cu: {what} failed ({err.name})" + (f":\n{log}" if log else ""))
    return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)


def compile_cubin(name, arch="sm_90"):
    """kernels_cuda/{name}.cu -> cubin bytes for arch (e.g. "sm_90"). Raises KernelError
    with the compiler's log."""
    nvrtc = _nvrtc()
    path = KERNELS / f"{name}.cu"
    if not path.is_file():
        raise KernelError(f"no kernel file {path}")
    options = [f"-arch={arch}", f"-I{KERNELS}", *OPTIONS]
    prog = _check(nvrtc.nvrtcCreateProgram(path.read_bytes(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram",
                  name=name)
    try:
        opts = [o.encode() for o in options]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "compiling", prog, name)
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize", prog, name)
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN", prog, name)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cached_cubin(name, arch):
    """The path of kernels_cuda/{name}.cu's cubin for arch, compiling it if the cache lacks it."""
    nvrtc = _nvrtc()
    sources = b"".join(p.read_bytes() for p in [KERNELS / f"{name}.cu", *sorted(KERNELS.glob("*.cuh"))])
    version = _check(nvrtc.nvrtcVersion(), "nvrtcVersion", name=name)
    key = hashlib.sha256(sources + repr((arch, OPTIONS, version)).encode()).hexdigest()[:24]
    path = cache_dir() / f"{name}-{arch}-{key}.cubin"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(compile_cubin(name, arch))
        os.replace(tmp, path)
    return path


@lru_cache(maxsize=None)
def module(name):
    """cupy.RawModule of kernels_cuda/{name}.cu for the current device (compiled once per process)."""
    import cupy

    cc = cupy.cuda.Device().compute_capability  # "90" on Hopper
    return cupy.RawModule(path=str(cached_cubin(name, arch(name, cc))))


@lru_cache(maxsize=None)
def function(name, kernel, smem=0):
    """One kernel (an extern "C" function) of kernels_cuda/{name}.cu. smem: the dynamic shared
    memory its launches use; its opt-in (needed beyond 48 KB) is set here, once."""
    f = module(name).get_function(kernel)
    if smem:
        f.max_dynamic_shared_size_bytes = smem
    return f


def require(condition, message):
    """A wrapper's precondition: raise KernelError(message) when it does not hold."""
    if not condition:
        raise KernelError(message)
