"""Checkpoint reading: Hugging Face safetensors folders and GGUF files, behind one interface.

    ckpt = open_checkpoint(path)        # parses headers only; tensor bytes stay on disk (mmap)
    ckpt.config                         # ModelConfig
    w = ckpt.get("model.layers.0.self_attn.q_proj.weight", (out, in), rows=slice(a, b))

Tensor names are the Hugging Face ones whatever the format; `get` returns float32 numpy
arrays in the Hugging Face layout ((out_features, in_features) for linears), reading only the
requested rows, so a tensor-parallel rank reads only its slice of a column-parallel weight.
`keep`: the GGUF block formats the caller multiplies by directly (backend.quantized_formats);
a tensor stored in one of them comes back as a quant.QuantTensor of its raw blocks instead.
A column range (a row-parallel weight) is cut after reading whole rows: the bytes are
strided on disk, so every page would be read anyway; only the slice is kept.
"""

import json
import os
import struct

import numpy as np

from . import quant
from .config import load_hf_config
from .errors import UserError, one_line


def open_checkpoint(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        return SafetensorsCheckpoint(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
        from .gguf_file import GGUFCheckpoint  # the gguf library is only imported for GGUF models

        return GGUFCheckpoint(path)
    raise UserError(f"{path}: not a model (expected a Hugging Face folder or a .gguf file)")


class Checkpoint:
    """Common part: shape checking before any byte is read. Subclasses set `path`, `config`,
    and implement `names()`, `_shape(name)` and `_read(name, rows)`, adding the tensor bytes
    they read from the file to `bytes_read`; one with quantized tensors also `_format(name)`
    and `_read_blocks(name, rows)` (a quant.QuantTensor)."""

    bytes_read = 0

    def get(self, name, shape, rows=None, cols=None, keep=()):
        if name not in self.names():
            raise UserError(f"{self._file_of(name)}: tensor {name!r} is missing")
        found = tuple(self._shape(name))
        if found != tuple(shape):
            raise UserError(f"{self._file_of(name)}: tensor {name!r} has shape {found}, expected {tuple(shape)}")
        if len(shape) == 2 and self._format(name) in keep and quant.whole_blocks(cols):
            blocks = self._read_blocks(name, rows)
            return blocks if cols is None else blocks.columns(cols)
        array = self._read(name, rows)
        return array if cols is None else np.ascontiguousarray(array[:, cols])

    def _format(self, name):
        """The quant.BLOCK_BYTES format the tensor is stored in, or None (float)."""
        return None

    def _file_of(self, name):
        return self.path


class SafetensorsCheckpoint(Checkpoint):
    """A folder with config.json and one `*.safetensors` file, or several listed in
    `model.safetensors.index.json`. Files are opened lazily, on the first tensor read from each."""

    def __init__(self, folder):
        self.path = folder
        self.config = load_hf_config(folder)
        self._handles = {}
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
            if not (isinstance(weight_map, dict) and all(isinstance(file, str) for file in weight_map.values())):
                raise UserError(f"{index}: weight_map: expected an object of tensor name -> file name")
            self._file = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                raise UserError(f"{folder}: no .safetensors file")
            self._file = {}
            for file in files:
                for name in self._open(os.path.join(folder, file)).keys():
                    self._file[name] = os.path.join(folder, file)

    def names(self):
        return self._file.keys()

    def _file_of(self, name):
        return self._file.get(name, self.path)

    def _open(self, file):
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            if not os.path.isfile(file):
                raise UserError(f"{file}: no such file (listed in the safetensors index)")
            try:
                # safe_open checks that the header is well formed and that its offsets
                # cover the file exactly, so truncated or padded files fail here.
                handle = _SafetensorsFile(file, safe_open(file, framework="numpy"))
            except Exception as e:  # the library raises its own SafetensorError and OSError
                raise UserError(f"{file}: not a valid safetensors file ({one_line(e)})") from None
            self._handles[file] = handle
        return handle

    def _shape(self, name):
        return self._open(self._file[name]).shape(name)

    def _read(self, name, rows):
        array, nbytes = self._open(self._file[name]).read(name, rows)
        self.bytes_read += nbytes
        return array


class _SafetensorsFile:
    """One opened .safetensors file. numpy has no bfloat16, which the library's numpy
    view then refuses; bf16 tensors are read from the byte offsets in the (validated)
    header and widened to float32 by a 16-bit shift."""

    def __init__(self, path, handle):
        self.path, self.handle = path, handle
        self._keys = handle.keys()  # in the file's order, the same on every rank
        self._names = set(self._keys)
        self._bf16 = None

    def keys(self):
        return self._keys

    def shape(self, name):
        if name not in self._names:  # the index said it is here
            raise UserError(f"{self.path}: tensor {name!r} is missing (model.safetensors.index.json places it here)")
        return self.handle.get_slice(name).get_shape()

    def read(self, name, rows):
        """(float32 array, bytes read from the file)."""
        part = self.handle.get_slice(name)
        dtype = part.get_dtype()
        if dtype not in ("F32", "F16", "BF16"):  # an integer or 8-bit tensor is not a weight we can read
            raise UserError(f"{self.path}: tensor {name!r} has dtype {dtype} (supported: F32, F16, BF16)")
        if dtype == "BF16":
            array = self._read_bf16(name, rows)
            return array, array.nbytes // 2
        array = part[rows] if rows is not None else self.handle.get_tensor(name)
        return np.ascontiguousarray(array, dtype=np.float32), array.nbytes

    def _read_bf16(self, name, rows):
        if self._bf16 is None:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._header = json.loads(f.read(n))
            self._bf16 = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + n)
        meta = self._header[name]
        begin, end = meta["data_offsets"]
        raw = self._bf16[begin:end].view(np.uint16).reshape(meta["shape"])
        if rows is not None:
            raw = raw[rows]
        return (raw.astype(np.uint32) << 16).view(np.float32)
