"""An independent float64 numpy implementation of the NOLA format v1 spec (the test oracle).

Written from docs/adapter-format.md only: Python-int Philox4x32-10, Triton's
uint_to_uniform_float, and the A/B contraction in float64.
"""

from __future__ import annotations

import numpy as np

M32 = 0xFFFFFFFF


def philox4x32_10(counter: int, seed: int) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter & M32, counter >> 32, 0, 0
    k0, k1 = seed & M32, seed >> 32
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c2 = ((p2 >> 32) ^ c1 ^ k0) & M32, ((p0 >> 32) ^ c3 ^ k1) & M32
        c1, c3 = p2 & M32, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def basis_values(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """float32 values of elements start..start+count-1, computed one counter at a time."""
    out = np.empty(count, dtype=np.float32)
    cache: dict[int, tuple[int, ...]] = {}
    for n in range(count):
        e = start + n
        c = stream * 2**40 + e // 4
        if c not in cache:
            cache[c] = philox4x32_10(c, seed)
        x = np.array(cache[c][e % 4], dtype=np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x).astype(np.float32)
        out[n] = np.float32(2) * (x * np.float32(4.6566127342e-10)) - np.float32(1)
    return out


def materialize(seed, rank, lora_alpha, targets, shapes, alpha, beta):
    """{(layer, module): (A [r, in], B [out, r], scale)} in float64."""
    L, T, k = alpha.shape
    l_ = beta.shape[2]
    out = {}
    for i in range(L):
        for t, name in enumerate(targets):
            n_in, n_out = shapes[name]
            s = 2 * (i * T + t)
            a_basis = basis_values(seed, s, 0, k * rank * n_in).astype(np.float64)
            b_basis = basis_values(seed, s + 1, 0, l_ * n_out * rank).astype(np.float64)
            A = np.asarray(alpha[i, t], np.float64) @ a_basis.reshape(k, -1) / np.sqrt(k)
            B = np.asarray(beta[i, t], np.float64) @ b_basis.reshape(l_, -1) / np.sqrt(l_)
            out[(i, name)] = (A.reshape(rank, n_in), B.reshape(n_out, rank), lora_alpha / rank)
    return out
