"""Array backends. Every op the model uses is a method of a backend object; the NumPy
backend is the reference (and the executable specification of each CUDA kernel)."""

from ..errors import UserError


def get_backend(name):
    if name in ("numpy", "auto"):
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "cuda":
        raise UserError("engine.backend: the CUDA backend is not built yet; use 'numpy' or 'auto'")
    raise UserError(f"engine.backend: unknown backend {name!r} (expected 'numpy', 'cuda' or 'auto')")
