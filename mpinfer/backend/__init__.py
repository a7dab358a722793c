"""Array backends. Every op the model uses is a method of a backend object; the NumPy
backend is the reference (and the executable specification of each CUDA kernel)."""

from ..errors import UserError


def gpu_problem():
    """Why the CUDA backend cannot run here (a one-line reason), or None when it can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install mpinfer[gpu], or cupy-cuda13x for CUDA 13)"
    try:
        from cuda.bindings import nvrtc  # noqa: F401  (our kernels compile through it)
    except ImportError:
        return "cuda-bindings (NVRTC) is not installed (pip install mpinfer[gpu])"
    if not cupy.is_available():
        return "no usable GPU (cupy.is_available() is False: no device or no driver)"
    return None


def on_gpu(name):
    """Whether engine.backend = name runs on the CUDA backend here (get_backend's choice)."""
    return name != "numpy" and gpu_problem() is None


def kv_element_bytes(name):
    """Bytes per KV-cache element of the backend engine.backend = name runs on here."""
    if on_gpu(name):
        from .cuda_backend import CudaBackend

        return CudaBackend.kv_bytes  # bf16
    from .numpy_backend import NumpyBackend

    return NumpyBackend.kv_bytes  # float32


def get_backend(name, comm=None):
    """The backend engine.backend names: "numpy", "cuda", or "auto" (cuda when a GPU is
    usable, else numpy). comm: the world communicator; on GPUs each rank takes the GPU of
    its node-local rank (cuda_comm.pick_device), without one GPU 0."""
    if name not in ("numpy", "cuda", "auto"):
        raise UserError(f"engine.backend: unknown backend {name!r} (expected 'numpy', 'cuda' or 'auto')")
    problem = gpu_problem() if name != "numpy" else "not asked for"
    if problem is None:
        from .cuda_backend import CudaBackend
        from .cuda_comm import pick_device

        return CudaBackend(pick_device(comm) if comm is not None else 0)
    if name == "cuda":
        raise UserError(f"engine.backend = 'cuda': {problem}")
    from .numpy_backend import NumpyBackend

    return NumpyBackend()
