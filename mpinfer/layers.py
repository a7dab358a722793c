"""The layers of a decoder block, each reading its weights from a checkpoint.

Legend: T new tokens of the batch, D hidden, H query heads, Hkv KV heads, Dh head dim,
I intermediate (MLP) size. Weights keep Hugging Face's layout: linears are (out, in).
"""

import numpy as np


class Linear:
    """y = x W^T + b with W (out, in). Several checkpoint linears reading the same input are
    fused into one (parts stacked along out): one larger matmul instead of several small ones.

    parts: [(checkpoint name, out features)]; the outputs come back split in that order."""

    def __init__(self, be, ckpt, parts, in_features, bias=False):
        self.be = be
        self.splits = np.cumsum([n for _, n in parts])[:-1]
        self.w = be.weight(np.concatenate([ckpt.get(f"{name}.weight", (n, in_features)) for name, n in parts]))
        self.b = be.weight(np.concatenate([ckpt.get(f"{name}.bias", (n,)) for name, n in parts])) if bias else None

    def __call__(self, x):
        y = self.be.linear(x, self.w, self.b)  # (T, sum of out)
        return np.split(y, self.splits, axis=-1) if len(self.splits) else y


class RMSNorm:
    def __init__(self, be, ckpt, name, size, eps):
        self.be, self.eps = be, eps
        self.w = be.weight(ckpt.get(f"{name}.weight", (size,)))

    def __call__(self, x):
        return self.be.rmsnorm(x, self.w, self.eps)


class Attention:
    """Grouped-query self-attention with RoPE, optional q/k bias (Qwen2), per-head q/k
    RMSNorm (Qwen3) and a sliding window (Mistral, some Qwen layers)."""

    def __init__(self, cfg, be, ckpt, layer):
        p = f"model.layers.{layer}.self_attn"
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.be, self.layer, self.window = be, layer, cfg.sliding_windows[layer]
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, Dh
        q_out, kv_out = cfg.num_heads * Dh, cfg.num_kv_heads * Dh
        self.qkv_proj = Linear(be, ckpt, [(f"{p}.q_proj", q_out), (f"{p}.k_proj", kv_out), (f"{p}.v_proj", kv_out)],
                               D, cfg.qkv_bias)
        self.o_proj = Linear(be, ckpt, [(f"{p}.o_proj", D)], q_out, cfg.o_bias)
        self.q_norm = RMSNorm(be, ckpt, f"{p}.q_norm", Dh, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(be, ckpt, f"{p}.k_norm", Dh, cfg.rms_eps) if cfg.qk_norm else None

    def __call__(self, x, cos, sin, kv, batch):
        """x (T, D), the new tokens of batch's sequences concatenated; cos, sin (T, Dh/2);
        kv: the paged cache whose pools hold this layer's K/V. Returns (T, D)."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = q.reshape(T, self.heads, self.head_dim)
        k = k.reshape(T, self.kv_heads, self.head_dim)
        v = v.reshape(T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.be.rope(q, cos, sin), self.be.rope(k, cos, sin)
        k_pool, v_pool = kv.k[self.layer], kv.v[self.layer]  # (slots, Hkv, Dh)
        self.be.store_kv(k_pool, batch.slots, k)
        self.be.store_kv(v_pool, batch.slots, v)
        out = self.be.paged_attention(q, k_pool, v_pool, batch, self.window)  # (T, H, Dh)
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))


class MLP:
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg, be, ckpt, layer):
        p = f"model.layers.{layer}.mlp"
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.be = be
        self.gate_up_proj = Linear(be, ckpt, [(f"{p}.gate_proj", I), (f"{p}.up_proj", I)], D, cfg.mlp_bias)
        self.down_proj = Linear(be, ckpt, [(f"{p}.down_proj", D)], I, cfg.mlp_bias)

    def __call__(self, x):
        return self.down_proj(self.be.silu_mul(*self.gate_up_proj(x)))
