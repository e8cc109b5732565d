"""Counter-based random numbers keyed by (seed, epoch, sample index, crop slot, draw number).

A sample's random choices then depend on who it is, not on which batch, rank or thread draws them:
the same crops for a given (seed, epoch, index) whatever the batch size, world size or resume point.
The mixing function is the SplitMix64 finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014; constants of Stafford's "Mix13"): a bijection on 64-bit words whose
output bits pass BigCrush when fed a counter. Keys chain it: h = mix(mix(mix(seed) ^ epoch) ^ index)...
and the j-th uniform of a key is the top 53 bits of mix(h ^ j), scaled to [0, 1).

`mix` is written for numpy uint64 arrays and compiles unchanged with numba (scalars), which is how the
FFCV decoder seeds its crop sampler from the same key (pipelines/ffcv.py).
"""
from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MUL1 = np.uint64(0xBF58476D1CE4E5B9)
MUL2 = np.uint64(0x94D049BB133111EB)


def mix(x):
    """SplitMix64 step + finaliser on uint64 (numpy arrays: wraps modulo 2^64 without warnings)."""
    z = x + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MUL1
    z = (z ^ (z >> np.uint64(27))) * MUL2
    return z ^ (z >> np.uint64(31))


def _words(value) -> np.ndarray:
    """Integers (scalar or array, may be negative) as uint64 words, at least 1-D."""
    return np.atleast_1d(np.asarray(value, dtype=np.int64)).view(np.uint64)


def keys(*parts) -> np.ndarray:
    """The chained key of integer parts (scalars or broadcastable arrays) -> uint64 array."""
    h = mix(_words(parts[0]))
    for part in parts[1:]:
        h = mix(h ^ _words(part))
    return h


def uniforms(key: np.ndarray, count: int) -> np.ndarray:
    """[len(key), count] float64 uniforms in [0, 1): draw j of key k is mix(k ^ j) >> 11, times 2^-53."""
    bits = mix(key.reshape(-1, 1) ^ np.arange(count, dtype=np.uint64).reshape(1, -1))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
