"""MoE routing on the GPU (kernels_cuda/moe_routing.cu): the router's softmax + top-k, pairs
grouped by expert, the row gather for the experts' matmuls and the weighted combine.

Shapes: T tokens, E experts, A = top experts per token; a pair is (token t, slot a) with the
flat index t*A + a; N pairs reach the experts (T*A, fewer after a capacity drop); D hidden.
The semantics are those of mpinfer/moe.py (MoE.route, MoE.__call__).
"""

import cupy
import numpy as np

from . import kernels

ROUTE_MAX_E = 256  # 8 router logits per lane of the token's warp
SHARED_INTS = 48 * 1024 // 4  # permute's per-warp histograms stay under the default 48 KB


def _fn(name):
    return kernels.function("moe_routing", name)


def _require_array(x, name, dtype, ndim):
    kernels.require(isinstance(x, cupy.ndarray), f"{name}: needs a cupy array, got {type(x).__name__}")
    kernels.require(x.dtype == dtype and x.ndim == ndim,
                    f"{name}: needs {np.dtype(dtype).name} with {ndim} dims, got {x.dtype} {x.shape}")
    kernels.require(x.flags.c_contiguous, f"{name}: needs a C-contiguous array, got strides {x.strides}")


def _out(out, shape, dtype, name):
    if out is None:
        return cupy.empty(shape, dtype)
    _require_array(out, name, dtype, len(shape))
    kernels.require(out.shape == shape, f"{name}: needs shape {shape}, got {out.shape}")
    return out


def route(logits, top, norm, out=None):
    """logits float32 (T, E), E <= 256 -> (experts int32 (T, top), weights float32 (T, top)):
    softmax in float32, the top experts by probability (ties to the lower id), weights
    renormalised to sum 1 when norm. out: optional (experts, weights) to write into."""
    _require_array(logits, "route logits", np.float32, 2)
    T, E = logits.shape
    kernels.require(1 <= E <= ROUTE_MAX_E, f"route logits: needs 1..{ROUTE_MAX_E} experts, got shape {logits.shape}")
    kernels.require(1 <= top <= min(E, 32), f"route top: needs 1..{min(E, 32)} for {E} experts, got {top}")
    experts = _out(None if out is None else out[0], (T, top), np.int32, "route experts")
    weights = _out(None if out is None else out[1], (T, top), np.float32, "route weights")
    if T:
        _fn("moe_route")(((T + 3) // 4,), (128,),  # one warp per token
                         (logits, experts, weights, np.int32(T), np.int32(E), np.int32(top), np.int32(bool(norm))))
    return experts, weights


def permute(experts, E, out=None):
    """experts int32 (T, A) (or (N,)), ids in [0, E) -> (order int32 (T*A,), counts int32 (E,)):
    order = np.argsort(experts.ravel(), kind="stable") (pairs grouped by expert, in pair order
    within an expert), counts = np.bincount(experts.ravel(), minlength=E). Ids outside [0, E)
    are not checked (they would write out of bounds). out: optional (order, counts)."""
    kernels.require(isinstance(experts, cupy.ndarray) and experts.dtype == np.int32 and experts.flags.c_contiguous,
                    f"permute experts: needs a C-contiguous cupy int32 array, got {type(experts).__name__} "
                    f"{getattr(experts, 'dtype', '')} {getattr(experts, 'shape', '')}")
    N = experts.size
    W = min(32, (SHARED_INTS - E) // E) if E > 0 else 0  # warps: W*E + E ints of shared memory
    kernels.require(W >= 1, f"permute E: needs 1..{SHARED_INTS // 2} experts, got {E}")
    kernels.require(N <= 2**30, f"permute experts: needs at most 2**30 pairs, got {N}")
    order = _out(None if out is None else out[0], (N,), np.int32, "permute order")
    counts = _out(None if out is None else out[1], (E,), np.int32, "permute counts")
    _fn("moe_permute")((1,), (32 * W,), (experts, order, counts, np.int32(N), np.int32(E)),
                       shared_mem=(W * E + E) * 4)
    return order, counts


def gather_rows(x, rows, out=None):
    """x float32 (T, D), rows int32 (N,) in [0, T) -> float32 (N, D) = x[rows] (the token of each
    pair, rows = order // A)."""
    _require_array(x, "gather_rows x", np.float32, 2)
    _require_array(rows, "gather_rows rows", np.int32, 1)
    N, D = rows.shape[0], x.shape[1]
    y = _out(out, (N, D), np.float32, "gather_rows out")
    vec = D % 4 == 0 and x.data.ptr % 16 == 0 and y.data.ptr % 16 == 0
    if N and D:
        _fn("moe_gather_rows")((N,), (128,), (x, rows, y, np.int32(N), np.int32(D), np.int32(vec)))
    return y


def combine(y, order, weights, T, out=None):
    """y float32 (N, D): the expert outputs of the pairs order (int32 (N,), distinct flat pair
    indices t*A + a) lists; weights float32 (T, A) -> float32 (T, D), row t = sum over a, in
    slot order, of weights[t, a] * (y of pair t*A + a); a pair absent from order (dropped by
    the capacity limit) adds nothing."""
    _require_array(y, "combine y", np.float32, 2)
    _require_array(order, "combine order", np.int32, 1)
    _require_array(weights, "combine weights", np.float32, 2)
    N, D = y.shape
    A = weights.shape[1]
    kernels.require(weights.shape[0] == T, f"combine weights: needs ({T}, A), got {weights.shape}")
    kernels.require(order.shape[0] == N and N <= T * A,
                    f"combine order: needs one entry per row of y ({N}) and at most T*A = {T * A}, got {order.shape}")
    result = _out(out, (T, D), np.float32, "combine out")
    inv = cupy.full(T * A, -1, np.int32)  # pair -> its row of y, -1 for a dropped pair
    if N:
        _fn("moe_inverse")(((N + 255) // 256,), (256,), (order, inv, np.int32(N)))
    if T and D:
        _fn("moe_combine")((T,), (128,), (y, inv, weights, result, np.int32(T), np.int32(A), np.int32(D)))
    return result
