"""GGUF checkpoints (llama.cpp's format) through the `gguf` library.

Tensor names are mapped to the Hugging Face ones; quantized tensors (Q8_0, Q4_0, Q4_1, the
K-quants, ...) are dequantized row range by row range with `gguf.quants.dequantize`, or,
for a backend that keeps Q8_0 / Q4_0 / Q4_1 weights as they are, handed out as their raw
blocks (quant.QuantTensor). GGUF shapes are written innermost-first: a Hugging Face
(out, in) linear is GGUF [in, out] and reads here as numpy (out, in).

Mixtral (written as llama, with llama.expert_count): the router is `ffn_gate_inp` and each
layer's experts are stacked into one tensor per projection, numpy (E, I, D) for gate and up,
(E, D, I) for down. Expert e of a stacked tensor is served under its Hugging Face name
(older files hold the same 2-D tensors as `blk.N.ffn_gate.e.weight`); reading it reads and
dequantizes only that expert's bytes (its row range of them, under tensor parallelism).

llama.cpp's converter permutes the rows of Q and K inside each head so that RoPE rotates
adjacent pairs (2i, 2i+1); `_unpermute` undoes it so the model's rotate-half RoPE applies,
as transformers does when it loads a GGUF.
"""

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from .config import gguf_config
from .errors import UserError, one_line
from .quant import BLOCK_BYTES, QuantTensor
from .weights import Checkpoint

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}  # Mixtral's gate, up, down
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


def hf_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight',
    'blk.3.ffn_up.5.weight' -> 'model.layers.3.block_sparse_moe.experts.5.w3.weight';
    unknown names unchanged."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 5 and parts[0] == "blk" and parts[2] in _EXPERT_NAMES:
        return f"model.layers.{parts[1]}.block_sparse_moe.experts.{parts[3]}.{_EXPERT_NAMES[parts[2]]}.{parts[4]}"
    return gguf_name


class _Reader(GGUFReader):
    # GGUFReader slices its np.memmap once per metadata item; for a 49k-token vocabulary
    # that is ~1e6 memmap views whose __array_finalize__ dominates parsing (3.4 s -> 1.1 s
    # for SmolLM2). A plain ndarray view of the same mapping behaves the same, minus that cost.
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, memmap):
        self._data = memmap.view(np.ndarray)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path):
        self.path = path
        try:
            # The reader maps every tensor's bytes (checking that each lies inside the file)
            # and raises ValueError, KeyError, IndexError... on malformed or missing bytes.
            reader = _Reader(path)
            self.meta = {name: field.contents() for name, field in reader.fields.items()}  # decodes strings
        except Exception as e:
            raise UserError(f"{path}: not a valid GGUF file, truncated or corrupted ({one_line(e)})") from None
        names = {t.name for t in reader.tensors}
        self.config = gguf_config(self.meta, path, "output.weight" not in names, "rope_freqs.weight" in names)
        self._tensors = {}  # HF name -> (GGUF tensor, expert index into it when stacked, else None)
        for t in reader.tensors:
            if t.name.endswith("_exps.weight"):
                self._check_experts(t)
                stem = t.name.removesuffix("_exps.weight")  # expert e: the older 'blk.N.ffn_gate.e.weight'
                self._tensors.update({hf_name(f"{stem}.{e}.weight"): (t, e) for e in range(self.config.num_experts)})
            else:
                self._tensors[hf_name(t.name)] = (t, None)
        self._reader = reader  # keeps the mapping alive

    def _check_experts(self, t):
        """Stacked experts must be (E, I, D), down (E, D, I): named here, as the file names them."""
        cfg = self.config
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        if not E:
            raise UserError(f"{self.path}: tensor {t.name!r} holds experts, but the metadata has no llama.expert_count")
        expected = (E, D, I) if t.name.endswith("down_exps.weight") else (E, I, D)
        found = tuple(int(n) for n in reversed(t.shape))
        if found != expected:
            raise UserError(f"{self.path}: tensor {t.name!r} has shape {found}, expected {expected} (experts, out, in)")

    def names(self):
        return self._tensors.keys()

    def _shape(self, name):
        t, expert = self._tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        return shape if expert is None else shape[1:]

    def _format(self, name):
        fmt = self._tensors[name][0].tensor_type.name.lower()
        return fmt if fmt in BLOCK_BYTES else None

    def _stored(self, name, rows):
        """The tensor's bytes as stored, rows `rows` of it: (rows, cols) or (rows, bytes per row)."""
        t, expert = self._tensors[name]
        data = t.data if expert is None else t.data[expert]  # a view
        data = data if rows is None else data[rows]
        self.bytes_read += data.nbytes  # quantized bytes, as stored
        return t, data

    def _read(self, name, rows):
        t, data = self._stored(name, rows)
        try:
            array = np.ascontiguousarray(_dequantize(data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which cannot be dequantized") from None
        return self._rows_in_order(name, array)

    def _read_blocks(self, name, rows):
        t, data = self._stored(name, rows)
        return QuantTensor(self._format(name), self._rows_in_order(name, np.ascontiguousarray(data)))

    def _rows_in_order(self, name, array):
        """Q and K rows (float32 values or whole rows of blocks) back in Hugging Face order."""
        if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            head_dim = self.config.head_dim
            if head_dim % 2 or len(array) % head_dim:
                raise UserError(f"{self.path}: tensor {name!r} has {len(array)} rows, not whole heads of an even "
                                f"llama.rope.dimension_count {head_dim}")
            array = _unpermute(array, head_dim)
        return array


def _dequantize(data, qtype):
    """float32 values of GGUF data: quantized data is (..., bytes per row) uint8."""
    quant = getattr(gguf.quants, qtype.name, None)
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or quant is None:
        return gguf.quants.dequantize(data, qtype)  # raises NotImplementedError if unknown
    # gguf.quants.dequantize works through 16 rows at a time in Python; one call on the
    # whole range is faster and, being large numpy ops, runs in parallel in loader threads.
    type_size = GGML_QUANT_SIZES[qtype][1]
    return quant.dequantize_blocks(data.reshape(-1, type_size)).reshape(*data.shape[:-1], -1)


def _unpermute(w, head_dim):
    """Inverse of llama.cpp's permute on rows of Q or K: within each head, rows stored as
    (pairs, 2) go back to (2, pairs). w: (heads * head_dim, ...), head-aligned."""
    heads = w.shape[0] // head_dim
    return w.reshape(heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

