"""Rotary position embedding frequencies for the RoPE variants of config.RopeConfig."""

import math

import numpy as np


def inv_freq(rope, head_dim, divisors=None):
    """(head_dim/2,) float64 angular frequency of each rotated pair.
    divisors: GGUF `rope_freqs` tensor (Llama-3 scaling as llama.cpp stores it), else None."""
    freq = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope.type == "linear":
        return freq / rope.factor
    if rope.type == "gguf_freqs":
        return freq / divisors
    if rope.type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * freq / rope.factor + smooth * freq
        return np.where(wavelen > low_wavelen, freq / rope.factor, np.where(wavelen < high_wavelen, freq, blended))
    return freq


def cos_sin(freq, positions):
    """cos and sin tables (T, head_dim/2) float32 for integer positions (T,)."""
    angles = positions.astype(np.float64)[:, None] * freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
