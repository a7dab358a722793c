"""The layers of a decoder block, each reading its weights (its tensor-parallel slice of
them) from a checkpoint.

Legend: T new tokens of the batch, D hidden, H query heads, Hkv KV heads, Dh head dim,
I intermediate (MLP) size, V vocabulary; P the tensor-parallel (TP) group size, r this
rank's place in it. Weights keep Hugging Face's layout: linears are (out, in).

Tensor parallelism (Megatron-LM): a column-parallel linear Y = X A with A = [A_1 ... A_P]
split by output columns gives each rank Y_r = X A_r, no communication; a row-parallel
linear takes that split input, Y = sum_r X_r A_r with A split by input rows, and one
all-reduce over the TP group completes the sum. QKV and gate/up are column-parallel, the
attention output and down projections row-parallel: two all-reduces per layer. Heads and
the KV cache are split by head; when there are fewer KV heads than ranks, each KV head is
held by the P / Hkv ranks whose query heads use it.
"""

import numpy as np

from . import context, quant
from .errors import UserError


class TP:
    """This rank's place in its TP group; group None (or of size 1) means no tensor
    parallelism. group: comm.Group (all_reduce in place).

    sp: sequence parallelism (Megatron-LM's, with TP). Between the TP regions each rank holds
    only its 1/P of the tokens' rows (rows()), so norms and residual adds run once per token
    instead of on every rank: a region starts by gathering the rows (begin: all-gather) and
    ends by summing and scattering them (finish: reduce-scatter) where plain TP all-reduces.
    A ring all-reduce is a reduce-scatter then an all-gather, so the bytes are the same."""

    def __init__(self, group=None, sp=False):
        self.group = group if group is not None and group.size > 1 else None
        self.size = group.size if self.group else 1
        self.rank = group.rank if self.group else 0
        self.sp = sp and self.group is not None
        self.tokens = 0  # T of the forward pass under way (set by the decoder)

    def rows(self, T):
        """The row counts (P,) of T tokens' rows over the group under sp: contiguous, in rank order."""
        return np.diff([T * r // self.size for r in range(self.size + 1)])

    def begin(self, x):
        """(rows here, D) -> (T, D) under sp; x unchanged otherwise."""
        return self.group.all_gather_rows(x, self.rows(self.tokens)) if self.sp else x

    def pick(self, x, indices):
        """Rows at sorted indices among the T tokens, from the ranks that hold them under sp."""
        if not self.sp:
            return x[indices]
        bounds = np.cumsum([0, *self.rows(self.tokens)])
        held = [(indices >= a) & (indices < b) for a, b in zip(bounds[:-1], bounds[1:])]
        return self.group.all_gather_rows(x[indices[held[self.rank]] - bounds[self.rank]], [h.sum() for h in held])

    def finish(self, y):
        """Complete a row-parallel product: the sum over the group, all T rows (all-reduce),
        or under sp this rank's rows of it (reduce-scatter)."""
        if self.sp:
            return self.group.reduce_scatter(y, self.rows(len(y)))
        return self.reduce(y)

    def part(self, n):
        """This rank's contiguous 1/P of range(n), as a slice."""
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)

    def reduce(self, y):
        """Complete a row-parallel product: sum over the TP group, in place."""
        return self.group.all_reduce(y) if self.group else y


def check_tp(cfg, size):
    """UserError naming the numbers when a TP size does not divide the model."""
    sizes = [("attention heads", cfg.num_heads), ("intermediate size", cfg.intermediate_size),
             ("vocabulary", cfg.vocab_size)]
    if cfg.shared_expert_size:  # routed experts are split by tp / ep (moe.check_ep)
        sizes.append(("shared expert size", cfg.shared_expert_size))
    problems = [f"{what} {n}" for what, n in sizes if n % size]
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        problems.append(f"KV heads {cfg.num_kv_heads} (neither divides the other)")
    if problems:
        raise UserError(f"parallel.tp = {size} does not divide the model's {', '.join(problems)}")


def kv_heads_per_rank(cfg, tp_size):
    return max(1, cfg.num_kv_heads // tp_size)  # 1 when the KV heads are replicated over P / Hkv ranks


def kv_heads_of(cfg, tp):
    """(first KV head, number of KV heads) this TP rank holds."""
    heads = cfg.num_heads // tp.size
    first = tp.rank * heads // (cfg.num_heads // cfg.num_kv_heads)  # the KV head of my first query head
    return first, kv_heads_per_rank(cfg, tp.size)


class Linear:
    """y = x W^T + b with W (out, in). Several checkpoint linears reading the same input are
    fused into one (parts stacked along out): one larger matmul instead of several small ones.

    parts: [(checkpoint name, full out features, rows kept or None)]; the outputs come back
    split in that order. cols: the input columns kept (row-parallel); then the output is a
    partial sum that `tp.reduce` completes, and the bias is added after the sum. Weights
    stored in a GGUF block format the backend multiplies by directly stay in it (quant.py).
    swiglu: parts are SwiGLU's gate and up; the output is silu(gate) * up (T, I), through
    be.swiglu_linear (on GPUs the GEMM's epilogue), the rows stored in be.swiglu_rows order."""

    def __init__(self, be, ckpt, parts, in_features, bias=False, cols=None, tp=None, swiglu=False):
        self.be, self.tp, self.swiglu = be, tp, swiglu
        self.splits = np.cumsum([len(range(n)[rows or slice(None)]) for _, n, rows in parts])[:-1]
        order = be.swiglu_rows if swiglu else (lambda rows: rows)
        self.w = be.weight(order(quant.concat([ckpt.get(f"{name}.weight", (n, in_features), rows, cols,
                                                        be.quantized_formats) for name, n, rows in parts])))
        self.b = be.bias(order(np.concatenate([ckpt.get(f"{name}.bias", (n,), rows)
                                               for name, n, rows in parts]))) if bias else None

    def __call__(self, x):
        if self.swiglu:
            return self.be.swiglu_linear(x, self.w, self.b)  # (T, I)
        if self.tp is None:
            y = self.be.linear(x, self.w, self.b)  # (T, sum of out)
            return np.split(y, self.splits, axis=-1) if len(self.splits) else y
        y = self.tp.finish(self.be.linear(x, self.w))  # (T, out): sum_r x_r W_r^T (under sp: my rows of it)
        return y + self.b if self.b is not None else y


class RMSNorm:
    """matmul_input: the result only feeds linears (the hidden-state norms), so a backend
    may hand it over in the matmuls' input format (on GPUs bf16: no separate cast pass)."""

    def __init__(self, be, ckpt, name, size, eps, matmul_input=False):
        self.be, self.eps, self.matmul_input = be, eps, matmul_input
        self.w = be.weight(ckpt.get(f"{name}.weight", (size,)))

    def __call__(self, x):
        return self.be.rmsnorm(x, self.w, self.eps, self.matmul_input)

    def add(self, x, delta):
        """(x + delta, its norm), in one pass where the backend fuses them."""
        return self.be.add_rmsnorm(x, delta, self.w, self.eps, self.matmul_input)


class Attention:
    """Grouped-query self-attention with RoPE, optional q/k bias (Qwen2), per-head q/k
    RMSNorm (Qwen3) and a sliding window (Mistral, some Qwen layers), on this rank's H / P
    query heads and their KV heads."""

    def __init__(self, cfg, be, ckpt, layer, tp, slot, cp_method="ring"):
        p = f"model.layers.{layer}.self_attn"
        self.context = context.ulysses_attention if cp_method == "ulysses" else context.ring_attention
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.be, self.tp, self.slot, self.window = be, tp, slot, cfg.sliding_windows[layer]  # slot: place in the KV pool
        self.heads, self.head_dim = cfg.num_heads // tp.size, Dh
        first_kv, self.kv_heads = kv_heads_of(cfg, tp)
        q_rows = tp.part(cfg.num_heads * Dh)
        kv_rows = slice(first_kv * Dh, (first_kv + self.kv_heads) * Dh)
        q_out, kv_out = cfg.num_heads * Dh, cfg.num_kv_heads * Dh
        self.qkv_proj = Linear(be, ckpt, [(f"{p}.q_proj", q_out, q_rows), (f"{p}.k_proj", kv_out, kv_rows),
                                          (f"{p}.v_proj", kv_out, kv_rows)], D, cfg.qkv_bias)
        self.o_proj = Linear(be, ckpt, [(f"{p}.o_proj", D, None)], q_out, cfg.o_bias, cols=q_rows, tp=tp)
        self.q_norm = RMSNorm(be, ckpt, f"{p}.q_norm", Dh, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(be, ckpt, f"{p}.k_norm", Dh, cfg.rms_eps) if cfg.qk_norm else None

    def __call__(self, x, cos, sin, kv, batch):
        """x (T, D), the new tokens of batch's sequences concatenated; cos, sin (T, Dh/2);
        kv: the paged cache whose pools hold this layer's K/V (this rank's KV heads).
        Returns (T, D), summed over the TP group (under sp: x and the result are my rows)."""
        x = self.tp.begin(x)
        T = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = q.reshape(T, self.heads, self.head_dim)  # (T, H/P, Dh)
        k = k.reshape(T, self.kv_heads, self.head_dim)
        v = v.reshape(T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_pool, v_pool = kv.k[self.slot], kv.v[self.slot]  # (slots, Hkv/P, Dh)
        # roped q and k; K and V stored at batch.slots (slot -1: under CP, a token another rank stores)
        q, k = self.be.rope_store_kv(q, k, v, cos, sin, k_pool, v_pool, batch)
        if batch.shares is not None:  # one long prompt over the CP group
            out = self.context(self.be, q, k, v, batch.shares, self.window, kv.cp)
        else:
            out = self.be.paged_attention(q, k_pool, v_pool, batch, self.window)  # (T, H/P, Dh)
            if any(keys is not None for keys in batch.key_pos):
                self._split_kv(q, k_pool, v_pool, batch, out)
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))

    def _split_kv(self, q, k_pool, v_pool, batch, out):
        """The rows of sequences sharded over the CP group (decode tokens, on every rank):
        attention over this rank's shard, merged with the other shards' (split-KV)."""
        starts = np.concatenate([[0], np.cumsum(batch.q_lens)])
        rows, outs, lses = [], [], []
        for i, keys in enumerate(batch.key_pos):
            if keys is not None:
                slots = batch.pool_slots(i, np.arange(len(keys)))
                row = slice(starts[i], starts[i + 1])
                o, lse = self.be.partial_attention(q[row], k_pool[slots], v_pool[slots], batch.positions[row], keys,
                                                   self.window)
                rows.append(np.arange(starts[i], starts[i + 1]))
                outs.append(o)
                lses.append(lse)
        out[np.concatenate(rows)] = context.split_kv_merge(np.concatenate(outs), np.concatenate(lses), batch.pool.cp)


class MLP:
    """SwiGLU: down(silu(gate(x)) * up(x)), on this rank's I / P intermediate features.
    prefix: the weights' names (default the layer's dense MLP); reduce=False leaves the
    row-parallel sum to the caller (MoE folds the shared expert into its own all-reduce)."""

    def __init__(self, cfg, be, ckpt, layer, tp, prefix=None, reduce=True):
        p = prefix or f"model.layers.{layer}.mlp"
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.be, self.tp = be, tp if reduce else TP()
        part = tp.part(I)
        self.gate_up_proj = Linear(be, ckpt, [(f"{p}.gate_proj", I, part), (f"{p}.up_proj", I, part)], D, cfg.mlp_bias,
                                   swiglu=True)
        self.down_proj = Linear(be, ckpt, [(f"{p}.down_proj", D, None)], I, cfg.mlp_bias, cols=part,
                                tp=tp if reduce else TP())

    def __call__(self, x):
        return self.down_proj(self.gate_up_proj(self.tp.begin(x)))  # gate_up_proj: silu(gate) * up, (T, I/P)
