"""Array backends. Every op the model uses is a method of a backend object; the NumPy
backend is the reference (and the executable specification of each CUDA kernel)."""

from ..errors import UserError


def get_backend(name):
    if name in ("numpy", "auto"):
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    raise UserError(f"engine.backend: unknown backend {name!r} (expected 'numpy', 'cuda' or 'auto')")
