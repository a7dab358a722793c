"""Key/value cache of one sequence: per layer K and V of shape (capacity, Hkv, Dh),
grown by doubling. The batch engine's paged cache offers the same store/advance calls."""

import numpy as np


class KVCache:
    def __init__(self, num_layers, kv_heads, head_dim):
        self.length = 0  # tokens cached (and committed by advance) so far
        self._shape = (kv_heads, head_dim)
        self._k = [np.empty((0, kv_heads, head_dim), np.float32) for _ in range(num_layers)]
        self._v = [np.empty((0, kv_heads, head_dim), np.float32) for _ in range(num_layers)]

    def store(self, layer, k, v):
        """Write the new tokens' k, v (n, Hkv, Dh) after the committed ones; return the
        layer's keys and values for positions 0 .. length+n-1, each (length+n, Hkv, Dh)."""
        end = self.length + k.shape[0]
        if end > self._k[layer].shape[0]:
            capacity = max(end, 2 * self._k[layer].shape[0], 16)
            for buffers in (self._k, self._v):
                grown = np.empty((capacity, *self._shape), np.float32)
                grown[: self.length] = buffers[layer][: self.length]
                buffers[layer] = grown
        self._k[layer][self.length : end] = k
        self._v[layer][self.length : end] = v
        return self._k[layer][:end], self._v[layer][:end]

    def advance(self, n):
        """Commit n tokens stored in every layer by the forward pass that just ran."""
        self.length += n
