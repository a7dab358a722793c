"""Weights left in their GGUF blocks (Q8_0, Q4_0, Q4_1) for a backend that multiplies by
them directly (the CUDA backend: W4A16 / W8A16, kernels_cuda/gemv_q.cu).

A backend lists the formats it keeps (`quantized_formats`; the NumPy backend none), and a
checkpoint hands out a QuantTensor instead of float32 for a tensor stored in one of them:
the raw blocks of its rows, (rows, cols/32 * block bytes) uint8, row-major as the file
stores them. Its numbers are defined by `dequantize()`, gguf.quants' own dequantization:

    Q8_0 (34 bytes): fp16 d, int8 q[32]              w[i] = d * q[i]
    Q4_0 (18 bytes): fp16 d, uint8 qs[16]            w[i] = d * (nib[i] - 8)
    Q4_1 (20 bytes): fp16 d, fp16 m, uint8 qs[16]    w[i] = d * nib[i] + m   (two roundings)
    nib[j] = qs[j] & 15, nib[j + 16] = qs[j] >> 4 (j < 16); float32 arithmetic.

Row slices (column-parallel linears) are whole rows of blocks; a column slice (row-parallel
linears) is kept only when it is whole 32-blocks, else the checkpoint dequantizes.
"""

import dataclasses

import numpy as np

BLOCK = 32  # weights per GGUF block
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


@dataclasses.dataclass(frozen=True)
class QuantTensor:
    """fmt: a key of BLOCK_BYTES; data: (rows, cols/32 * BLOCK_BYTES[fmt]) uint8 blocks
    (numpy on the host; the CUDA backend keeps the same object with a cupy array)."""

    fmt: str
    data: object

    @property
    def shape(self):
        rows, nbytes = self.data.shape
        return rows, nbytes // BLOCK_BYTES[self.fmt] * BLOCK

    def dequantize(self):
        """float32 (rows, cols), exactly gguf.quants.dequantize of the same bytes."""
        import gguf.quants

        blocks = np.ascontiguousarray(self.data).reshape(-1, BLOCK_BYTES[self.fmt])
        return getattr(gguf.quants, self.fmt.upper()).dequantize_blocks(blocks).reshape(self.shape)

    def columns(self, cols):
        """The columns `cols` (a slice of whole blocks, whole_blocks(cols))."""
        bb = BLOCK_BYTES[self.fmt]
        return QuantTensor(self.fmt, np.ascontiguousarray(self.data[:, cols.start // BLOCK * bb:cols.stop // BLOCK * bb]))


def whole_blocks(cols):
    """Whether a column slice (None: all columns) cuts rows at GGUF block boundaries."""
    return cols is None or (cols.step in (None, 1) and cols.start % BLOCK == 0 and cols.stop % BLOCK == 0)


def concat(parts):
    """Rows of several tensors stacked (a fused linear: QKV, gate/up). Quantized parts of
    one format stay quantized; any other mix is dequantized to float32 (the same numbers
    the NumPy backend reads)."""
    if all(isinstance(p, QuantTensor) and p.fmt == parts[0].fmt for p in parts):
        return QuantTensor(parts[0].fmt, np.concatenate([p.data for p in parts]))
    return np.concatenate([p.dequantize() if isinstance(p, QuantTensor) else p for p in parts])
